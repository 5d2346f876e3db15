"""Precomputed latents, text embeddings and expert features (`lafid cache`): same training, no decoding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lafid.cofe.data as data_module
from lafid.cofe.cache import ClipCache, cache_rng, read_index
from lafid.cofe.precompute import build_cache
from lafid.cofe.data import ClipDataset, collate
from lafid.cofe.train import Trainer
from cofe_fixtures import pose_shards, tiny_recipe  # noqa: F401  (fixture)

# Cached and uncached inputs come from the same encoders on the same frames; the cache
# runs them per part in batches of data.batch_size, training in its own batches, so
# float32 sums may differ in their last bits. Losses must agree to 1e-5 relative.
RTOL = 1e-5


def with_cache(recipe, folder: Path, output_dir: Path):
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"cache": folder}),
                                     "train": recipe.train.model_copy(update={"output_dir": output_dir})})


def fixed_draw(monkeypatch):
    """The uncached dataset draws each clip's window and reference as the cache did."""
    sample = ClipDataset.sample
    monkeypatch.setattr(ClipDataset, "sample",
                        lambda self, row, rng: sample(self, row, cache_rng(self.cfg.seed, row["clip_id"])))


def test_cached_training_gives_the_uncached_losses_without_decoding(pose_shards, tmp_path, monkeypatch):  # noqa: F811
    shards, rows = pose_shards
    # with text and face dropout: the cached run uses the empty caption embedding kept when its encoders were freed
    plain = tiny_recipe(shards, tmp_path / "plain", steps=3, save_every=1000, lr=5e-2, text_drop=0.5, face_drop=0.25)
    cached = with_cache(plain, tmp_path / "cache", tmp_path / "cached")
    made = build_cache(cached, shard_size=5)
    assert (made.clips, made.skipped, made.parts) == (len(rows), 0, 3)
    assert set(read_index(tmp_path / "cache")) == {r["clip_id"] for r in rows}

    # the cached tensors are the encoders' outputs on the cached draw
    cache = ClipCache(tmp_path / "cache")
    trainer = Trainer(plain)
    ds = ClipDataset(plain.data)
    row = ds._row(0, 0)
    uncached = collate([ds.sample(row, cache_rng(plain.data.seed, row["clip_id"]))])
    hit = cache.sample(row["clip_id"])
    with torch.no_grad():
        torch.testing.assert_close(hit["latents"], trainer.core.encode_video(uncached["frames"])[0],
                                   rtol=RTOL, atol=1e-6)
        torch.testing.assert_close(hit["text_embeds"], trainer.core.text(uncached["caption"])[0], rtol=RTOL, atol=1e-6)
        for k, v in trainer.core.face_features(uncached).items():
            torch.testing.assert_close(hit[f"feat.{k}"], v[0], rtol=RTOL, atol=1e-6)
    assert hit["caption"] == row["caption"]

    fixed_draw(monkeypatch)
    reference = Trainer(plain).fit(progress=False).losses
    monkeypatch.undo()

    def no_decoding(*args, **kwargs):
        raise AssertionError("video decoded although the cache holds every clip")

    monkeypatch.setattr(data_module, "decode_frames", no_decoding)
    trainer = Trainer(cached)
    assert trainer.core.vae is None and trainer.core.text is None and trainer.core.experts is None  # freed
    got = trainer.fit(progress=False).losses
    print(f"\nlosses uncached (cache's draw) {reference}\nlosses cached {got}")
    np.testing.assert_allclose(got, reference, rtol=RTOL)
    monkeypatch.undo()

    # control: the uncached trainer's own draws (new window and reference per sample) train differently
    own = Trainer(plain.model_copy(update={"train": plain.train.model_copy(
        update={"output_dir": tmp_path / "own"})})).fit(progress=False).losses
    assert not np.allclose(own, reference, rtol=1e-3)


def test_cache_resumes_and_refuses_another_recipe(pose_shards, tmp_path):  # noqa: F811
    shards, rows = pose_shards
    recipe = with_cache(tiny_recipe(shards, tmp_path / "run"), tmp_path / "cache", tmp_path / "run")
    # two processes' shares, the second "interrupted" before its index line
    first = build_cache(recipe, shard_size=4, rank=0, world_size=2)
    assert first.clips == len(rows) // 2
    assert len(ClipCache(tmp_path / "cache")) == len(rows) // 2
    with pytest.raises(ValueError, match="lacks 6 clip"):
        ClipDataset(recipe.data)  # an incomplete cache is not silently mixed with decoding
    rest = build_cache(recipe, shard_size=4)
    assert (rest.clips, rest.skipped) == (len(rows) // 2, len(rows) // 2)
    again = build_cache(recipe)
    assert (again.clips, again.parts) == (0, 0)
    assert len(ClipDataset(recipe.data).cache) == len(rows)

    # interrupted after a part was written but before its index line: those clips are redone
    index = sorted((tmp_path / "cache").glob("_index-r*.jsonl"))[0]
    lines = index.read_text().splitlines()
    index.write_text("\n".join(lines[:-1]) + "\n")
    lost = len(json.loads(lines[-1])["clips"])
    assert build_cache(recipe).clips == lost

    other = recipe.model_copy(update={"data": recipe.data.model_copy(update={"height": 48})})
    with pytest.raises(ValueError, match="another recipe.*data"):
        build_cache(other)


def test_cli_cache_builds_resumes_and_names_a_missing_folder(pose_shards, tmp_path):  # noqa: F811
    import yaml
    from typer.testing import CliRunner

    from lafid.cli import app

    shards, rows = pose_shards
    recipe = tiny_recipe(shards, tmp_path / "run")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    run = CliRunner().invoke(app, ["cache", "--recipe", str(path), "--no-progress"])
    assert run.exit_code == 2 and "has no data.cache" in run.output  # control: nowhere to write
    run = CliRunner().invoke(app, ["cache", "--recipe", str(path), "--out", str(tmp_path / "c"), "--no-progress"])
    assert run.exit_code == 0, run.output
    assert f"cached {len(rows)} clips" in run.output and len(read_index(tmp_path / "c")) == len(rows)
    run = CliRunner().invoke(app, ["cache", "--recipe", str(path), "--out", str(tmp_path / "c"), "--no-progress"])
    assert f"cached 0 clips in 0 files ({len(rows)} cached before)" in run.output
