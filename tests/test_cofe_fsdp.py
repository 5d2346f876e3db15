"""CoFE at scale on CPU: bf16 frozen models, FSDP over 2 gloo processes with sharded checkpoints (and the
same losses as DDP, and as one process with the same global batch), one DataLoader across epochs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lafid.cofe.train import Trainer
from cofe_fixtures import pose_shards, tiny_recipe  # noqa: F401  (fixture)


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state (mixed precision included): reset it around the test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_frozen_models_train_with_float32_cofe(pose_shards, tmp_path, fresh_accelerate):  # noqa: F811
    shards, _ = pose_shards
    recipe = tiny_recipe(shards, tmp_path / "bf16", steps=3, save_every=1000, mixed_precision="bf16",
                         frozen_dtype="bfloat16", lr=5e-2)
    trainer = Trainer(recipe)
    core = trainer.core
    frozen = [p for m in (core.vae, core.text, core.experts) for p in m.parameters()]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    kept = set(core.transformer._keep_in_fp32_modules)  # norms, time embedding: float32, as from_pretrained keeps them
    dtypes = {name: p.dtype for name, p in core.transformer.named_parameters() if not p.requires_grad}
    assert all(d == (torch.float32 if kept & set(n.split(".")) else torch.bfloat16) for n, d in dtypes.items())
    assert sum(d == torch.bfloat16 for d in dtypes.values()) > len(dtypes) / 2
    assert {p.dtype for p in core.trainable_state().values()} == {torch.float32}
    before = {k: v.detach().clone() for k, v in core.trainable_state().items()}
    losses = trainer.fit(progress=False).losses
    print(f"\nbf16 losses {losses}")
    assert np.isfinite(losses).all()
    assert all(not torch.equal(before[k], v) for k, v in core.trainable_state().items()
               if "lora_B" in k or "to_out" in k)
    # control: the float32 recipe really is float32
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    plain = Trainer(tiny_recipe(shards, tmp_path / "fp32", steps=1))
    assert {p.dtype for p in plain.core.transformer.parameters()} == {torch.float32}


def _join(rank: int, world: int, port: int) -> None:
    """Make this spawned process rank `rank` of a gloo group on CPU."""
    import os

    os.environ.update(ACCELERATE_USE_CPU="true",  # what `accelerate launch --cpu` sets: gloo over CPU processes
                      RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _spawn(job, *args) -> None:
    """Run `job(rank, 2, port, *args)` in 2 spawned processes on a free localhost port."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(job, args=(2, port, *args), nprocs=2, start_method="spawn")


def _fsdp_job(rank: int, world: int, port: int, shards: str, root: str) -> None:
    """One of 2 gloo ranks: straight 2n steps; n steps, stop, resume n more; both with FSDP."""
    from pathlib import Path

    from safetensors.torch import save_file

    from lafid.cofe.shard import gathered_state
    from lafid.cofe.checkpoint import latest_checkpoint

    _join(rank, world, port)
    root = Path(root)
    n = 2
    # as the 14B recipe runs: bf16 frozen models and autocast, gradient checkpointing, EMA
    settings = dict(steps=2 * n, save_every=n, grad_accum=1, warmup_steps=2, lr=5e-2, distributed="fsdp",
                    save_total_limit=1, ema_decay=0.9, mixed_precision="bf16", frozen_dtype="bfloat16",
                    gradient_checkpointing=True)
    straight = Trainer(tiny_recipe(shards, root / "straight", **settings))
    assert straight.sharded and straight.acc.num_processes == world
    losses = straight.fit(progress=False).losses
    whole = gathered_state(straight.core.trainable_state())
    first = Trainer(tiny_recipe(shards, root / "split", **settings))
    first.fit(steps=n, progress=False)
    after_n = gathered_state(first.core.trainable_state())
    resumed = Trainer(tiny_recipe(shards, root / "split", **settings))
    resumed.load(latest_checkpoint(root / "split"))
    again = resumed.fit(progress=False).losses
    # FSDP against the same run unsharded (DDP: every rank the whole model), same data and draws per sample,
    # in float32: in bf16 FSDP casts the weights where DDP autocasts ops, and AdamW at lr 5e-2 turns that
    # rounding into whole steps (0.45 % apart at step 4 on one CPU, 1.1 % on another)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # mixed precision is process-wide; the gloo group stays
    exact = {**settings, "mixed_precision": "no", "frozen_dtype": "float32", "save_every": 100}
    fsdp_losses = Trainer(tiny_recipe(shards, root / "fsdp32", **exact)).fit(progress=False).losses
    ddp = Trainer(tiny_recipe(shards, root / "ddp32", **{**exact, "distributed": "ddp"}))
    assert not ddp.sharded
    ddp_losses = ddp.fit(progress=False).losses
    if rank == 0:
        save_file(whole, str(root / "straight.safetensors"))
        save_file(gathered_state(resumed.core.trainable_state()), str(root / "resumed.safetensors"))
        save_file(after_n, str(root / "after_n.safetensors"))
        (root / "losses.json").write_text(json.dumps(
            {"straight": losses, "resumed": again, "fsdp": fsdp_losses, "ddp": ddp_losses}))
    else:
        gathered_state(resumed.core.trainable_state())  # a collective: every rank takes part


def test_fsdp_two_processes_save_sharded_and_resume_to_identical_parameters(pose_shards, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    shards, _ = pose_shards
    _spawn(_fsdp_job, str(shards), str(tmp_path))

    straight = load_file(str(tmp_path / "straight.safetensors"))
    resumed = load_file(str(tmp_path / "resumed.safetensors"))
    after_n = load_file(str(tmp_path / "after_n.safetensors"))
    assert straight.keys() == resumed.keys() and straight
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(straight[k], after_n[k]) for k in straight)  # steps n+1..2n changed them
    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["straight"][2:] == losses["resumed"]
    # FSDP trains as DDP does, step by step (float32)
    print(f"\nlosses FSDP {losses['fsdp']}, DDP {losses['ddp']}")
    assert np.allclose(losses["fsdp"], losses["ddp"], rtol=1e-4)
    # sharded checkpoint: each rank holds half of every sharded tensor; save_total_limit keeps the newest only
    ckpts = sorted(p.name for p in (tmp_path / "split").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-4"]
    ck = tmp_path / "split" / "checkpoint-4"
    r0, r1 = load_file(str(ck / "shard-rank0.safetensors")), load_file(str(ck / "shard-rank1.safetensors"))
    whole = load_file(str(ck / "trainable.safetensors"))
    for k, v in whole.items():
        a, b = r0[f"param.{k}"], r1[f"param.{k}"]
        assert a.shape[0] + b.shape[0] == v.shape[0] and torch.equal(torch.cat([a, b]), v)
        assert r0[f"optim.{k}.exp_avg"].shape == a.shape  # AdamW moments exist for the shard only
    # the EMA is gathered too (what generate and load_cofe read), and it is not the raw weights
    ema = load_file(str(ck / "ema.safetensors"))
    assert ema.keys() == whole.keys()
    assert all(torch.equal(torch.cat([r0[f"ema.{k}"], r1[f"ema.{k}"]]), v) for k, v in ema.items())
    assert any(not torch.equal(ema[k], whole[k]) for k in whole)


def _split_recipe(shards, out, batch_size: int, **train):
    """The float32 recipe of the FSDP-against-one-process comparison, at a per-process batch size."""
    r = tiny_recipe(shards, out, steps=3, save_every=100, warmup_steps=0, lr=1e-3, face_drop=0.5, text_drop=0.5,
                    **train)
    return r.model_copy(update={"data": r.data.model_copy(update={"batch_size": batch_size})})


def _fsdp_half_batch_job(rank: int, world: int, port: int, shards: str, root: str) -> None:
    """One of 2 gloo ranks training with FSDP at half the global batch each."""
    from pathlib import Path

    from safetensors.torch import save_file

    from lafid.cofe.shard import gathered_state

    _join(rank, world, port)
    trainer = Trainer(_split_recipe(shards, Path(root) / "fsdp", 1, distributed="fsdp"))
    assert trainer.sharded
    losses = trainer.fit(progress=False).losses
    state = gathered_state(trainer.core.trainable_state())
    if rank == 0:
        save_file(state, str(Path(root) / "fsdp.safetensors"))
        (Path(root) / "fsdp.json").write_text(json.dumps(losses))


def test_fsdp_on_two_ranks_matches_one_process_with_the_same_global_batch(pose_shards, tmp_path, monkeypatch,
                                                                          fresh_accelerate):  # noqa: F811
    """2 ranks x batch 1 with FSDP = 1 process x batch 2 (float32, face and text dropout on): same samples in
    the same steps, same noise, timestep and dropout per sample (seeded by its place in the epoch).

    Losses after 3 steps agree to rtol 1e-5 and parameters to atol 1e-5 (measured: losses within 2.4e-7,
    parameters within 6.3e-7, all-reduce rounding; an AdamW step at lr 1e-3 moves them ~1e-3). Control: the
    single process drawing every sample's randomness from one generator per process, as the trainer did
    before, is far off. With that former seeding (a generator per rank, data draws per (rank, position))
    the two runs measured a loss gap of 9.8e-2 and a parameter gap of 5.9e-3."""
    from safetensors.torch import load_file

    import lafid.cofe.train as train_module

    shards, rows = pose_shards
    assert len(rows) >= 6  # 3 steps of 2 samples within epoch 0
    _spawn(_fsdp_half_batch_job, str(shards), str(tmp_path))
    fsdp, fsdp_losses = load_file(str(tmp_path / "fsdp.safetensors")), json.loads((tmp_path / "fsdp.json").read_text())

    def one_process(out):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        trainer = Trainer(_split_recipe(shards, tmp_path / out, 2))
        assert trainer.acc.num_processes == 1 and not trainer.sharded
        losses = trainer.fit(progress=False).losses
        return losses, {k: v.detach() for k, v in trainer.core.trainable_state().items()}

    losses, state = one_process("single")
    gap = max(abs(a - b) for a, b in zip(losses, fsdp_losses))
    far = max((state[k] - fsdp[k]).abs().max().item() for k in state)
    print(f"\nlosses FSDP 2x1 {fsdp_losses}, 1 process x2 {losses}; max |loss gap| {gap:.2e}, |param gap| {far:.2e}")
    assert state.keys() == fsdp.keys() and state
    assert np.allclose(losses, fsdp_losses, rtol=1e-5, atol=0)
    assert all(torch.allclose(state[k], fsdp[k], rtol=0, atol=1e-5) for k in state)

    # control: draws from one generator per process (the former seeding) lose the match
    per_process = torch.Generator().manual_seed(0)
    monkeypatch.setattr(train_module, "sample_generators", lambda seed, places: [per_process] * len(places))
    control, control_state = one_process("control")
    off = max(abs(a - b) for a, b in zip(control, fsdp_losses))
    print(f"control (one generator per process) {control}; max |loss gap| {off:.2e}")
    assert not np.allclose(control[1:], fsdp_losses[1:], rtol=1e-3, atol=0)
    assert any(not torch.allclose(control_state[k], fsdp[k], rtol=0, atol=1e-4) for k in state)


def test_one_loader_spans_epochs_and_the_position_follows(pose_shards, tmp_path, monkeypatch):  # noqa: F811
    import lafid.cofe.train as train_module

    shards, rows = pose_shards
    made = []

    class CountingLoader(train_module.DataLoader):
        def __init__(self, *args, **kwargs):
            made.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_module, "DataLoader", CountingLoader)
    recipe = tiny_recipe(shards, tmp_path, num_workers=1, steps=9, save_every=1000)
    trainer = Trainer(recipe)
    seen = []
    model_forward = trainer.model.forward

    def spy(batch, generator, *a, **kw):
        seen.extend(batch["clip_id"])
        return model_forward(batch, generator, *a, **kw)

    monkeypatch.setattr(trainer.model, "forward", spy)
    trainer.fit(progress=False)
    per_epoch = trainer.dataset.epoch_length(0)
    assert per_epoch == len(rows) and recipe.data.batch_size == 2
    # 18 samples: all of epoch 0 once, then the start of epoch 1, from one DataLoader whose worker persists
    assert len(made) == 1 and made[0]["persistent_workers"] is True
    assert (trainer.epoch, trainer.offset) == (1, 18 - per_epoch)
    assert sorted(seen[:per_epoch]) == sorted(r["clip_id"] for r in rows)
    ds = trainer.dataset
    epoch1 = [ds._row(f, r)["clip_id"] for f, r in ds.rank_order(1)[:18 - per_epoch]]
    assert seen[per_epoch:] == epoch1
    assert epoch1 != seen[:len(epoch1)]  # each epoch has its own order
