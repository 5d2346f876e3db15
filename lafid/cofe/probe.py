"""Does CoFE read the face? Train on clips of different people that share one caption, then compare losses.

With every caption the same, the only way for CoFE to lower the loss of a clip
below the others' is to read that clip's reference face. After training, each
clip is scored with the same fixed (noise, timestep) draws under four conditions:

- `matched`: its own reference face;
- `swapped`: the reference face of another person in the batch (rolled by one);
- `grey`: a mid-grey image as the face (all three experts see it);
- `detached`: no face at all (the adapter is off: the frozen backbone alone).

`matched` < `swapped` means the face carries information the model uses.

Samples are precomputed once (VAE latents, caption embedding, ArcFace embedding of
the aligned reference face, i2v inputs), so a probe run trains in seconds on CPU.
The tiny recipe's VAE has random weights, and its latents differ between clips by
only a few per cent of their variance (a fixed pattern dominates); `standardise`
rescales each latent element over the probe set so clip content is visible to the
loss, as a trained VAE's latents are.
"""

from __future__ import annotations

import torch

from lafid.cofe.data import collate
from lafid.cofe.model import CoFEModel

CONDITIONS = ("matched", "swapped", "grey", "detached")


@torch.no_grad()
def precompute(model: CoFEModel, samples: list[dict], batch_size: int) -> list[dict]:
    """Dataset samples -> batches carrying latents, text embeddings and ArcFace embeddings (`has_id`)."""
    out = []
    for i in range(0, len(samples), batch_size):
        b = collate(samples[i:i + batch_size])
        frames = b.pop("frames")
        b["latents"] = model.encode_video(frames)
        b["text_embeds"] = model.text(b["caption"])
        identity_embeddings(model, b)
        if model.recipe.mode == "i2v":
            b["i2v_condition"] = model.i2v_condition(frames)
            image = model.image_embeds(frames)
            if image is not None:
                b["image_embeds"] = image
        out.append(b)
    return out


def identity_embeddings(model: CoFEModel, b: dict) -> None:
    """ArcFace embeddings of the batch's identity faces, one per face (`id_mask` marks the present ones
    when a sample has several), set as precomputed (`id_embedding`, `has_id`)."""
    if b["id_face"].dim() == 5:
        b["id_embedding"] = model.experts.identity(b["id_face"], mask=b["id_mask"])
        b["has_id"] = b["id_mask"].clone()
    else:
        b["id_embedding"] = model.experts.identity.encode(b["id_face"])
        b["has_id"] = torch.ones(len(b["clip_id"]), dtype=torch.bool)


def standardise(batches: list[dict]) -> list[dict]:
    """Latents (and i2v condition latents) standardised per element over all batches."""
    lat = torch.cat([b["latents"] for b in batches])
    mean, std = lat.mean(0), lat.std(0).clamp_min(1e-6)
    for b in batches:
        b["latents"] = (b["latents"] - mean) / std
        if "i2v_condition" in b:
            b["i2v_condition"][:, 4:] = (b["i2v_condition"][:, 4:] - mean) / std
    return batches


def train(model: CoFEModel, batches: list[dict], steps: int, lr: float, seed: int = 0) -> list[float]:
    """AdamW on the trainable parameters, cycling through `batches`; losses per step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=model.recipe.train.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(batches[step % len(batches)], generator)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, model.recipe.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def variant(model: CoFEModel, batch: dict, condition: str) -> dict | None:
    """The batch under a condition (None = no face: `detached`)."""
    if condition == "matched":
        return batch
    if condition == "detached":
        return None
    out = dict(batch)
    n = len(batch["clip_id"])
    if condition == "swapped":
        idx = torch.roll(torch.arange(n), 1)
        for key in ("face", "id_face", "id_embedding", "id_mask", "has_id"):
            if key in batch:
                out[key] = batch[key][idx]
    elif condition == "grey":
        out["face"] = torch.full_like(batch["face"], 128)
        out["id_face"] = torch.full_like(batch["id_face"], 128)
        identity_embeddings(model, out)
    else:
        raise ValueError(f"unknown condition {condition!r}; known: {CONDITIONS}")
    return out


@torch.no_grad()
def condition_loss(model: CoFEModel, batch: dict, condition: str, draws: int = 8, seed: int = 1000) -> float:
    """Mean flow-matching loss over `draws` fixed (noise, timestep) draws under `condition`."""
    v = variant(model, batch, condition)
    total = 0.0
    for i in range(draws):
        g = torch.Generator().manual_seed(seed + i)
        if v is None:
            keep = torch.zeros(len(batch["clip_id"]), dtype=torch.bool)
            total += model(batch, g, keep_face=keep, keep_text=torch.ones_like(keep)).item()
        else:
            keep = torch.ones(len(batch["clip_id"]), dtype=torch.bool)
            total += model(v, g, keep_face=keep, keep_text=keep).item()
    return total / draws


def condition_losses(model: CoFEModel, batch: dict, draws: int = 8, seed: int = 1000) -> dict[str, float]:
    return {c: condition_loss(model, batch, c, draws, seed) for c in CONDITIONS}
