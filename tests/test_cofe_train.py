"""CoFE training on CPU: overfits curated clips, resumes exactly, runs from the CLI."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from lafid.cli import app
from lafid.cofe.data import ClipDataset, collate
from lafid.cofe.train import Trainer, latest_checkpoint
from tests.cofe_fixtures import pipeline_shards, tiny_recipe  # noqa: F401  (fixture)


def eval_loss(trainer: Trainer, batch: dict, draws: int = 8) -> float:
    """Mean loss over fixed noise/timestep draws: the same measurement before and after training."""
    with torch.no_grad():
        return sum(trainer.core(batch, torch.Generator().manual_seed(i)).item() for i in range(draws)) / draws


def test_tiny_config_overfits_curated_clips(pipeline_shards, tmp_path):  # noqa: F811
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
