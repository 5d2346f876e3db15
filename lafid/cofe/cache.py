"""Precomputed training inputs: per clip VAE latents, text embeddings and expert features.

`lafid cache --recipe R` draws one training sample per clip (target window and
reference face seeded by the clip id, `cache_rng`), runs the frozen VAE, text
encoder and face experts on it once, in the recipe's `train.frozen_dtype`, and
writes the results under `data.cache`:

- `part-<hash>.safetensors`: up to `shard_size` clips, tensors named
  `<clip_id>/<key>` (`latents`, `text_embeds`, `feat.id`, `feat.sem`, `feat.det`,
  and in i2v mode `i2v_condition`, `image_embeds`); each clip's caption and pose
  buckets in the file's metadata. Names come from the clip ids they hold, files
  are written under a temporary name and renamed.
- `_index-r<rank>.jsonl`: one line per finished part (its file and clip ids),
  appended after the rename: the completion record. A rerun skips every clip in
  an index, so an interrupted cache resumes (under any number of processes).
- `_cache.json`: the fingerprint of everything the tensors depend on (encoder
  models, frame count, size, stride, face crop, data seed, dtype, mode). A cache
  made for another recipe is refused rather than silently mixed.

Processes split the clips (`accelerate launch -m lafid.cli cache ...`: every
process takes every world_size-th clip not cached yet). With a cache present
`ClipDataset` yields these tensors instead of decoding video; a cached clip
always shows the same draw (the uncached trainer draws a new window and
reference each epoch).

This module holds the format and the reader (`ClipDataset` opens it); the writer,
which draws samples through `ClipDataset`, is `lafid.cofe.precompute`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from lafid.cofe.config import CoFERecipe

CACHE_META = "_cache.json"
INDEX_GLOB = "_index-r*.jsonl"
FEATURES = ("id", "sem", "det")
TENSORS = ("latents", "text_embeds", *(f"feat.{k}" for k in FEATURES), "i2v_condition", "image_embeds")
LABELS = ("caption", "target_buckets", "ref_bucket", "clip_buckets")


def cache_rng(seed: int, clip_id: str) -> np.random.Generator:
    """The cached draw of a clip: a function of the data seed and the clip id only."""
    return np.random.default_rng([seed, int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], "little")])


def fingerprint(recipe: CoFERecipe) -> dict:
    """What cached tensors depend on; a cache is valid for a recipe whose fingerprint is equal."""
    d = recipe.data
    dump = recipe.model_dump(mode="json")
    return {
        "mode": recipe.mode,
        "dtype": recipe.train.frozen_dtype,
        "data": {k: getattr(d, k) for k in ("num_frames", "frame_stride", "height", "width", "face_size",
                                            "face_margin", "id_backend", "id_model_sha256", "id_references",
                                            "seed")},
        "models": {k: dump[k] for k in ("vae", "text", "identity", "semantic", "detail", "image_encoder")},
        "image_dim": (recipe.transformer.config.get("image_dim") if recipe.transformer.config else
                      _read_config(recipe.transformer.path).get("image_dim")) if recipe.mode == "i2v" else None,
    }


def _read_config(path: Path | None) -> dict:
    for name in ("config.json", "transformer/config.json"):
        if path is not None and (Path(path) / name).exists():
            return json.loads((Path(path) / name).read_text())
    return {}


def read_index(folder: Path) -> dict[str, str]:
    """clip id -> part file name, over every finished part."""
    out: dict[str, str] = {}
    for index in sorted(Path(folder).glob(INDEX_GLOB)):
        for line in index.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                out.update({c: entry["file"] for c in entry["clips"]})
    return out


def check_meta(folder: Path, recipe: CoFERecipe, create: bool = False) -> None:
    path = Path(folder) / CACHE_META
    want = fingerprint(recipe)
    if path.exists():
        have = json.loads(path.read_text())
        if have != want:
            diff = sorted(k for k in want if have.get(k) != want[k])
            raise ValueError(f"cache {folder} was made for another recipe (differs in {', '.join(diff)}); "
                             f"use another data.cache folder or remove it")
    elif create:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(want, indent=1))
        tmp.replace(path)
    else:
        raise FileNotFoundError(f"{folder} is no cache ({CACHE_META} missing); make it with `lafid cache`")


def clip_ids(dataset, f: int) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_table(dataset.files[f], columns=["clip_id"], filesystem=dataset.fs)["clip_id"].to_pylist()


def open_cache(folder: Path | None, dataset) -> "ClipCache | None":
    """The cache a ClipDataset reads: None when `folder` is unset or absent; refused when it lacks a clip."""
    if folder is None or not (Path(folder) / CACHE_META).exists():
        return None
    cache = ClipCache(folder)
    missing = []
    for f, rows in enumerate(dataset.rows):
        ids = clip_ids(dataset, f)
        missing += [ids[r] for r in rows if ids[r] not in cache]
    if missing:
        raise ValueError(f"cache {folder} lacks {len(missing)} clip(s) of data.shards (e.g. {missing[0]}); "
                         f"complete it with `lafid cache --recipe ...` (it resumes)")
    return cache


class ClipCache:
    """Reads cached samples by clip id (parts opened lazily, a few kept open)."""

    def __init__(self, folder: Path, recipe: CoFERecipe | None = None, keep_open: int = 4):
        self.folder = Path(folder)
        if recipe is not None:
            check_meta(self.folder, recipe)
        self.files = read_index(self.folder)
        self.keep_open = keep_open
        self._open: OrderedDict[str, tuple[object, dict]] = OrderedDict()

    def __contains__(self, clip_id: str) -> bool:
        return clip_id in self.files

    def __len__(self) -> int:
        return len(self.files)

    def _part(self, name: str):
        from safetensors import safe_open

        if name not in self._open:
            handle = safe_open(str(self.folder / name), framework="pt")
            self._open[name] = (handle, json.loads(handle.metadata()["labels"]))
            while len(self._open) > self.keep_open:
                self._open.popitem(last=False)
        self._open.move_to_end(name)
        return self._open[name]

    def sample(self, clip_id: str) -> dict:
        handle, labels = self._part(self.files[clip_id])
        out = {"clip_id": clip_id, **labels[clip_id]}
        for key in TENSORS:
            name = f"{clip_id}/{key}"
            if name in handle.keys():
                out[key] = handle.get_tensor(name)
        return out

    def __getstate__(self):  # DataLoader workers reopen their own handles
        return {**self.__dict__, "_open": OrderedDict()}


def collate_cached(samples: list[dict]) -> dict:
    """Stack cached samples into the batch CoFEModel reads (`latents`, `text_embeds`, `features`, ...)."""
    batch = {k: [s[k] for s in samples] for k in ("clip_id", *LABELS)}
    if "place" in samples[0]:  # the sample's place in its epoch (`ClipDataset`), which seeds its noise
        batch["place"] = [s["place"] for s in samples]
    for key in TENSORS:
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    batch["features"] = {k: batch.pop(f"feat.{k}") for k in FEATURES}
    return batch
