"""CoFE reads the face: six real people, one caption, CoFE alone (no LoRA) on CPU.

Every clip has the same caption, so the only way to make one clip's loss lower
than another's is the reference face. After a short training run each clip must
be better predicted with its own person's face than with another person's, over
the same fixed (noise, timestep) draws (`lafid.cofe.probe`).
"""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from cofe_fixtures import identity_recipe, identity_shards  # noqa: F401  (fixture)
from lafid.cofe import probe
from lafid.cofe.data import ClipDataset
from lafid.cofe.maps import attention_maps, face_share, write_maps
from lafid.cofe.model import CoFEModel

STEPS, LR, DRAWS = 300, 1e-2, 8
MARGIN = 0.03  # swapped must exceed matched by at least 3 % of matched


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core box several threads wait on each other (6x slower here),
    and a fixed thread count keeps float sums, hence the measured losses, the same run to run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def identity_samples(identity_shards):  # noqa: F811
    """Three samples per person (different windows and reference faces), decoded once."""
    shards, rows = identity_shards
    ds = ClipDataset(identity_recipe(shards, "unused").data)
    samples = []
    for epoch in range(3):
        ds.set_position(epoch, 0)
        samples += list(ds)
    return shards, rows, samples


@pytest.mark.parametrize("injection", ["fused", "per_expert"])
def test_matched_face_beats_another_persons_face(identity_samples, tmp_path, injection):
    shards, rows, samples = identity_samples
    assert len({r["caption"] for r in rows}) == 1 and len(rows) == 6
    recipe = identity_recipe(shards, tmp_path, injection=injection)
    assert recipe.cofe.lora_rank == 0
    start = time.perf_counter()
    torch.manual_seed(0)
    model = CoFEModel(recipe)
    assert not [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("adapter.")]
    batches = probe.standardise(probe.precompute(model, samples, len(rows)))
    evaluation = batches[0]
    assert sorted(evaluation["clip_id"]) == sorted(r["clip_id"] for r in rows)  # one clip per person

    before = {c: probe.condition_loss(model, evaluation, c, DRAWS) for c in ("matched", "swapped")}
    assert before["matched"] == before["swapped"]  # zero-initialised injection: the face changes nothing yet

    losses = probe.train(model, batches, STEPS, LR)
    after = probe.condition_losses(model, evaluation, DRAWS)
    print(f"\n{injection}: train {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}; "
          + ", ".join(f"{c} {v:.3f}" for c, v in after.items()) + f" ({time.perf_counter() - start:.0f}s)")
    assert after["swapped"] - after["matched"] >= MARGIN * after["matched"], after
    assert after["matched"] < after["grey"] and after["matched"] < after["detached"], after

    if injection == "fused":
        return
    # per-expert attention maps of the trained model on each real clip, written as PNG
    by_id = {r["clip_id"]: r for r in rows}
    shares = []
    for i, clip in enumerate(evaluation["clip_id"]):
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else [v[i]] if isinstance(v, list) else v)
               for k, v in evaluation.items()}
        maps = attention_maps(model, one)
        assert set(maps) == {"id", "sem", "det"} and all(m.shape == (2, 2, 4, 4) for m in maps.values())
        assert np.abs(maps["id"] - maps["det"]).max() > 0  # each expert has its own map
        paths = write_maps(maps, samples[i]["frames"].numpy(), tmp_path / "maps", prefix=f"{clip}-")
        assert [cv2.imread(str(p)).shape for p in paths] == [(64, 128, 3)] * 3
        shares.append({k: face_share(m.mean(0), square_box(by_id[clip])) for k, m in maps.items()})
    mean = {k: np.mean([s[k][0] for s in shares]) for k in shares[0]}
    area = np.mean([s["id"][1] for s in shares])
    print(f"map mass inside the face box (area share {area:.2f}): "
          + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()))

    # the command-line tool, from a checkpoint folder, on a real clip
    from safetensors.torch import save_file

    from lafid.cofe.maps import main

    ckpt = tmp_path / "checkpoint-300"
    ckpt.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.trainable_state().items()},
              ckpt / "trainable.safetensors")
    (ckpt / "recipe.json").write_text(recipe.model_dump_json())
    main(["--checkpoint", str(ckpt), "--video", by_id["carphone"]["source"], "--start", "0.5",
          "--out", str(tmp_path / "cli_maps")])
    written = sorted(p.name for p in (tmp_path / "cli_maps").glob("*.png"))
    assert written == ["det.png", "id.png", "sem.png"]
    assert cv2.imread(str(tmp_path / "cli_maps" / "id.png")).std() > 10  # a picture, not a blank


def square_box(row: dict) -> list[float]:
    """The row's median face box in the centre-square crop the dataset feeds the VAE."""
    w, h = row["width"], row["height"]
    side = min(w, h)
    x0, y0, x1, y1 = np.median(np.asarray(row["frame_box"]), 0) * [w, h, w, h]
    dx, dy = (w - side) / 2, (h - side) / 2
    return [(x0 - dx) / side, (y0 - dy) / side, (x1 - dx) / side, (y1 - dy) / side]
