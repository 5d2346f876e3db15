"""Writing the training-input cache (`lafid cache --recipe R`); the format and its reader are
`lafid.cofe.cache`. Kept apart from the reader because writing needs `ClipDataset` to draw
the samples, while `ClipDataset` needs the reader: one module for both would import in a circle.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from lafid.cofe.cache import CACHE_META, LABELS, cache_rng, check_meta, clip_ids, fingerprint, read_index
from lafid.cofe.config import CoFERecipe
from lafid.cofe.data import ClipDataset, collate


def dtype_of(recipe: CoFERecipe) -> torch.dtype:
    return torch.bfloat16 if recipe.train.frozen_dtype == "bfloat16" else torch.float32


class Encoders(nn.Module):
    """The frozen models that turn a sample into training inputs (no transformer): VAE, text encoder, experts.

    `encode_video` / `i2v_condition` are CoFEModel's own, so cached and uncached
    inputs come from the same code.
    """

    def __init__(self, recipe: CoFERecipe, device: torch.device | str = "cpu"):
        super().__init__()
        from lafid.cofe.experts import FaceExperts
        from lafid.cofe.model import TextEncoder, build_vae

        self.recipe = recipe
        dtype = dtype_of(recipe)
        torch.manual_seed(recipe.train.seed)  # as the trainer: models given by config get its random weights
        if recipe.transformer.path is None:
            from lafid.cofe.model import build_transformer

            build_transformer(recipe.transformer)  # draws the random numbers the trainer's transformer draws
        dtype = None if dtype == torch.float32 else dtype  # loaded as CoFEModel loads them
        self.vae = build_vae(recipe.vae, dtype).requires_grad_(False).eval()
        self.text = TextEncoder(recipe.text, dtype)
        self.experts = FaceExperts(recipe.identity, recipe.semantic, recipe.detail)
        if dtype is not None:
            self.experts.to(dtype)
        self.to(device=device)
        from lafid.cofe.model import image_encoder

        self.image_encoder = image_encoder(recipe, self.experts, fingerprint(recipe)["image_dim"], dtype)
        if self.image_encoder is not None:
            self.image_encoder.to(device)
        self.transformer = SimpleNamespace(device=torch.device(device))  # what CoFEModel's methods ask for

    @torch.no_grad()
    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        """Cached tensors of a collated uncached batch, per key, batch first."""
        from lafid.cofe.model import CoFEModel

        device = self.transformer.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype_of(self.recipe) == torch.bfloat16):
            out = {"latents": CoFEModel.encode_video(self, batch["frames"]), "text_embeds": self.text(batch["caption"])}
            emb = batch.get("id_embedding")
            mask = batch.get("id_mask")
            feats = self.experts(batch["face"].to(device), None if emb is None else emb.to(device),
                                 batch["has_id"].to(device), batch["id_face"].to(device),
                                 None if mask is None else mask.to(device))
            out.update({f"feat.{k}": v for k, v in feats.items()})
            if self.recipe.mode == "i2v":
                out["i2v_condition"] = CoFEModel.i2v_condition(self, batch["frames"])
                if self.image_encoder is not None:
                    out["image_embeds"] = CoFEModel.image_embeds(self, batch["frames"])
        return out



@dataclass
class CacheResult:
    clips: int          # cached by this process in this call
    skipped: int        # already in the cache
    parts: int
    seconds: float


def build_cache(recipe: CoFERecipe, folder: Path | None = None, shard_size: int = 64, rank: int = 0,
                world_size: int = 1, device: str | None = None, progress: bool = False) -> CacheResult:
    """Cache every clip of the recipe's shards not cached yet (this process's share); see the module doc."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    folder = Path(folder or recipe.data.cache or "")
    if not str(folder) or folder == Path(""):
        raise ValueError("no cache folder: set data.cache in the recipe or pass --out")
    if rank == 0:
        check_meta(folder, recipe, create=True)
    else:
        for _ in range(600):
            if (folder / CACHE_META).exists():
                break
            time.sleep(0.1)
    check_meta(folder, recipe)
    start = time.perf_counter()
    dataset = ClipDataset(recipe.data.model_copy(update={"cache": None}))
    done = read_index(folder)
    todo, seen = [], set(done)
    for f, rows in enumerate(dataset.rows):
        ids = clip_ids(dataset, f)
        for r in rows:
            if ids[r] not in seen:
                seen.add(ids[r])
                todo.append((f, r))
    mine = todo[rank::world_size]
    encoders = Encoders(recipe, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    parts, batch_size = 0, max(1, recipe.data.batch_size)
    index = folder / f"_index-r{rank}.jsonl"
    bar = tqdm(total=len(mine), disable=not progress, desc="cache", unit="clip")
    for lo in range(0, len(mine), shard_size):
        tensors: dict[str, torch.Tensor] = {}
        labels: dict[str, dict] = {}
        chunk = mine[lo:lo + shard_size]
        for b in range(0, len(chunk), batch_size):
            samples = []
            for f, r in chunk[b:b + batch_size]:
                row = dataset._row(f, r)
                samples.append(dataset.sample(row, cache_rng(recipe.data.seed, row["clip_id"])))
            for key, value in encoders(collate(samples)).items():
                for s, v in zip(samples, value):
                    tensors[f"{s['clip_id']}/{key}"] = v.detach().to("cpu").contiguous().clone()
            for s in samples:
                labels[s["clip_id"]] = {k: s[k] for k in LABELS}
            bar.update(len(samples))
        ids = sorted(labels)
        name = f"part-{hashlib.sha256(chr(0).join(ids).encode()).hexdigest()[:16]}.safetensors"
        tmp = folder / f".{name}.tmp{os.getpid()}"
        save_file(tensors, str(tmp), metadata={"labels": json.dumps(labels)})
        tmp.replace(folder / name)
        with index.open("a") as fh:  # the completion record, after the part is in place
            fh.write(json.dumps({"file": name, "clips": ids}) + "\n")
        parts += 1
    bar.close()
    return CacheResult(clips=len(mine), skipped=len(done), parts=parts, seconds=time.perf_counter() - start)
