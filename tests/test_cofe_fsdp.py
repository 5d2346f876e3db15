"""CoFE at scale on CPU: bf16 frozen models, FSDP over 2 gloo processes with sharded checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lafid.cofe.train import Trainer
from tests.cofe_fixtures import pose_shards, tiny_recipe  # noqa: F401  (fixture)


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
    frozen = [p for m in (core.transformer, core.vae, core.text, core.experts) for p in m.parameters()
              if not p.requires_grad]
    assert frozen and {p.dtype for p in frozen} == {torch.bfloat16}
    assert {p.dtype for p in core.trainable_state().values()} == {torch.float32}
    before = {k: v.detach().clone() for k, v in core.trainable_state().items()}
    losses = trainer.fit(progress=False).losses
    print(f"\nbf16 losses {losses}")
    assert np.isfinite(losses).all()
    assert all(not torch.equal(before[k], v) for k, v in core.trainable_state().items() if "lora_B" in k or "to_out" in k)
    # control: the float32 recipe really is float32
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    plain = Trainer(tiny_recipe(shards, tmp_path / "fp32", steps=1))
    assert {p.dtype for p in plain.core.transformer.parameters()} == {torch.float32}
