"""The checkpoint format's readers and pruning (`lafid.cofe.checkpoint`), on folders laid out as
`lafid train` lays them out; training itself writes and resumes them in test_cofe_train.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lafid.cofe.checkpoint import (DONE, EMA_WEIGHTS, WEIGHTS, checkpoint_weights, latest_checkpoint, load_weights,
                                   prune_checkpoints)


def checkpoint(root, step: int, done: bool = True, ema: bool = False):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), float(step))}, str(folder / WEIGHTS))
    if ema:
        save_file({"w": torch.full((2,), -float(step))}, str(folder / EMA_WEIGHTS))
    if done:
        (folder / DONE).write_text(str(step))
    return folder


def test_latest_and_prune_go_by_step_and_leave_unfinished_checkpoints(tmp_path):
    for step in (1, 2, 10):
        checkpoint(tmp_path, step)
    checkpoint(tmp_path, 11, done=False)  # being written (or cut short): never resumed from, never pruned
    # by step number: as text, checkpoint-2 would sort after checkpoint-10
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    gone = prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in gone] == ["checkpoint-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-11", "checkpoint-2"]
    assert prune_checkpoints(tmp_path, keep=None) == [] and latest_checkpoint(tmp_path / "none") is None


def test_weights_are_the_ema_unless_asked_otherwise_or_a_file_is_named(tmp_path):
    with_ema, plain = checkpoint(tmp_path, 3, ema=True), checkpoint(tmp_path, 4)
    weights, path = checkpoint_weights(with_ema)
    assert path.name == EMA_WEIGHTS and weights["w"].tolist() == [-3.0, -3.0]
    weights, path = checkpoint_weights(with_ema, ema=False)
    assert path.name == WEIGHTS and weights["w"].tolist() == [3.0, 3.0]
    assert checkpoint_weights(plain)[1].name == WEIGHTS  # no EMA kept: the trained weights
    assert checkpoint_weights(with_ema / WEIGHTS)[0]["w"].tolist() == [3.0, 3.0]
    with pytest.raises(FileNotFoundError, match="checkpoint-N"):
        checkpoint_weights(tmp_path / "missing")


def test_a_torch_weights_file_is_read_without_running_pickled_code(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "state.pt")
    assert load_weights(tmp_path / "state.pt")["w"].tolist() == [1.0, 1.0]
    torch.save({"w": torch.ones(2), "code": print}, tmp_path / "pickled.pt")  # an object a plain load would run
    with pytest.raises(Exception, match="[Ww]eights only"):
        load_weights(tmp_path / "pickled.pt")
