"""CoFE training on CPU: overfits curated clips, resumes exactly, runs from the CLI."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from lafid.cli import app
from lafid.cofe.data import ClipDataset, collate
from lafid.cofe.checkpoint import latest_checkpoint
from lafid.cofe.train import Trainer
from cofe_fixtures import pipeline_shards, pose_shards, tiny_recipe  # noqa: F401  (fixture)


def eval_loss(trainer: Trainer, batch: dict, draws: int = 8) -> float:
    """Mean loss over fixed noise/timestep draws: the same measurement before and after training."""
    with torch.no_grad():
        return sum(trainer.core(batch, torch.Generator().manual_seed(i)).item() for i in range(draws)) / draws


def test_tiny_config_overfits_curated_clips(pipeline_shards, tmp_path):  # noqa: F811
    """The training loop optimises: the bundled tiny recipe (CoFE + LoRA r=8 on attention and proj_out) fits
    five curated clips. Most of this drop comes through the LoRA and a face-agnostic bias, so it says nothing
    about the face being read; tests/test_cofe_identity.py measures that, with CoFE alone."""
    recipe = tiny_recipe(pipeline_shards, tmp_path, steps=60, save_every=1000)
    trainer = Trainer(recipe)
    clips = collate(list(ClipDataset(recipe.data)))
    assert 2 <= len(clips["clip_id"]) <= 8  # a handful, from the real pipeline
    before = eval_loss(trainer, clips)
    result = trainer.fit(progress=False)
    after = eval_loss(trainer, clips)
    print(f"\noverfit: eval loss {before:.4f} -> {after:.4f} ({1 - after / before:.0%} lower) "
          f"in {result.steps} steps, {result.seconds:.1f}s")
    assert after <= 0.5 * before


def trained_params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.core.trainable_state().items()}


def test_stop_and_resume_gives_the_same_parameters(pipeline_shards, tmp_path):  # noqa: F811
    n = 3
    # one DataLoader worker: the data position must survive worker processes too
    settings = dict(steps=2 * n, save_every=n, grad_accum=2, warmup_steps=4, num_workers=1)
    straight = Trainer(tiny_recipe(pipeline_shards, tmp_path / "straight", **settings))
    straight.fit(progress=False)

    first = Trainer(tiny_recipe(pipeline_shards, tmp_path / "split", **settings))
    first.fit(steps=n, progress=False)
    ckpt = latest_checkpoint(tmp_path / "split")
    assert ckpt is not None and ckpt.name == f"checkpoint-{n}"
    resumed = Trainer(tiny_recipe(pipeline_shards, tmp_path / "split", **settings))
    resumed.load(ckpt)
    assert (resumed.epoch, resumed.offset) == (first.epoch, first.offset)
    resumed.fit(progress=False)

    a, b = trained_params(straight), trained_params(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], trained_params(first)[k]) for k in a)  # steps n+1..2n did change them


def test_cli_train_runs_and_resumes(pipeline_shards, tmp_path):  # noqa: F811
    recipe = tiny_recipe(pipeline_shards, tmp_path / "run", steps=2, save_every=1)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(recipe))
    runner = CliRunner()
    first = runner.invoke(app, ["train", "--recipe", str(path), "--no-progress"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["train", "--recipe", str(path), "--steps", "3", "--no-progress"])
    assert again.exit_code == 0 and "step 3" in again.output, again.output
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint-3"
    bad = runner.invoke(app, ["train", "--recipe", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 2 and "not found" in bad.output


def recipe_yaml(recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json"))


def test_cli_trains_the_tiny_i2v_recipe_with_dropout_ema_and_decay(pipeline_shards, tmp_path):  # noqa: F811
    import json

    from safetensors.torch import load_file

    from lafid.cofe.api import load_cofe
    from lafid.cofe.config import load_cofe_recipe

    r = load_cofe_recipe("cofe_tiny_i2v")
    assert r.mode == "i2v" and r.transformer.config["in_channels"] == 36 and r.train.ema_decay > 0
    recipe = r.model_copy(update={
        "data": r.data.model_copy(update={"shards": [str(pipeline_shards)], "num_workers": 0}),
        "train": r.train.model_copy(update={"output_dir": tmp_path / "run", "steps": 4, "save_every": 4,
                                            "log_every": 1})})
    path = tmp_path / "i2v.yaml"
    path.write_text(recipe_yaml(recipe))
    result = CliRunner().invoke(app, ["train", "--recipe", str(path), "--no-progress"])
    assert result.exit_code == 0 and "step 4" in result.output, result.output
    ckpt = latest_checkpoint(tmp_path / "run")
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [m["lr"] for m in metrics]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < lrs[0]  # cosine decay
    assert all(len(m["gate_entropy"]) == 2 and 0 < min(m["gate_entropy"]) <= 1.0987 for m in metrics)
    trained, ema = load_file(str(ckpt / "trainable.safetensors")), load_file(str(ckpt / "ema.safetensors"))
    assert trained.keys() == ema.keys() and any(not torch.equal(trained[k], ema[k]) for k in trained)
    # the public API builds CoFE from the folder alone and attaches it to a fresh I2V transformer
    from lafid.cofe.model import build_transformer

    cofe = load_cofe(ckpt)
    transformer = build_transformer(cofe.recipe.transformer)
    cofe.attach(transformer)
    assert all(len(b.attn2._forward_hooks) == 1 for b in transformer.blocks)
    assert torch.equal(cofe.adapter.layers[0].cross.to_out.weight, ema["adapter.layers.0.cross.to_out.weight"])
    cofe.detach()
    assert all(len(b.attn2._forward_hooks) == 0 for b in transformer.blocks)

    # attached through the API, a transformer predicts what the training model predicts
    from lafid.cofe.model import CoFEModel

    model = CoFEModel(cofe.recipe).eval()
    model.load_state_dict(trained, strict=False)
    batch = collate(list(ClipDataset(recipe.data))[:1])
    x0 = model.encode_video(batch["frames"])
    cond, image, text = model.i2v_condition(batch["frames"]), model.image_embeds(batch["frames"]), \
        model.text(batch["caption"])
    noisy, t = torch.randn_like(x0), torch.tensor([700.0])
    with torch.no_grad():
        want = model.denoise(noisy, t, text, model.face_features(batch), cond, image)
        model.adapter.detach()
        api = load_cofe(ckpt, ema=False)
        api.experts = model.experts  # the tiny recipe's experts are random: share the training model's
        api.attach(model.transformer).set_reference(batch["face"], batch["id_face"])
        got = model.transformer(torch.cat([noisy, cond], 1), t, text, encoder_hidden_states_image=image,
                                return_dict=False)[0]
        api.clear()
        plain = model.transformer(torch.cat([noisy, cond], 1), t, text, encoder_hidden_states_image=image,
                                  return_dict=False)[0]
    torch.testing.assert_close(got, want)
    assert (plain - want).abs().max() > 1e-6  # the face did change the prediction


def test_ema_follows_every_step_and_generation_loads_it(pose_shards, tmp_path):  # noqa: F811
    """EMA_n = d EMA_(n-1) + (1 - d) W_n after each optimizer step; `lafid generate` (and load_cofe) read the
    EMA by default. Controls: an EMA never updated stays at W_0; the raw weights are not the EMA."""
    from lafid.bench.generate import load_model

    d = 0.5
    recipe = tiny_recipe(pose_shards[0], tmp_path / "run", steps=2, save_every=2, ema_decay=d, lr=5e-2)
    trainer = Trainer(recipe)
    want = trained_params(trainer)
    for step in (1, 2):
        trainer.fit(steps=step, progress=False)
        now = trained_params(trainer)
        want = {k: d * want[k] + (1 - d) * now[k] for k in want}
        assert all(torch.allclose(trainer.ema[k], want[k], atol=1e-6) for k in want)
        assert any(not torch.allclose(trainer.ema[k], now[k]) for k in want)
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe_yaml(recipe))
    ckpt = latest_checkpoint(tmp_path / "run")
    model, _, weights = load_model(path, ckpt)
    assert weights.name == "ema.safetensors"
    got = model.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
    raw, _, weights = load_model(path, ckpt, ema=False)
    assert weights.name == "trainable.safetensors"
    assert all(torch.equal(raw.state_dict()[k], now[k]) for k in now)
