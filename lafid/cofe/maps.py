"""Per-expert attention maps of a trained CoFE (`injection: per_expert`) on a clip, written as PNG.

For each expert k, the map at a video token is what that expert adds there:
g_k |W_out attn_k(q)|, from the expert's own cross-attention, averaged over blocks
(and, in `maps`, per block). The fused injection has one attention for the gated
sum of experts, so it gives one map ("fused").

    python -m lafid.cofe.maps --checkpoint out/cofe/checkpoint-100 --video clip.mp4 --start 1.0 --out maps/

Each PNG is the first target frame with the map (per latent frame, side by side)
laid over it; `face_share` says how much of a map falls inside the face box.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import torch

from lafid.cofe.fusion import EXPERTS
from lafid.cofe.model import CoFEModel


@torch.no_grad()
def attention_maps(model: CoFEModel, batch: dict, s: float = 0.5, seed: int = 0) -> dict[str, np.ndarray]:
    """Maps of sample 0 at noise level `s` (0 clean .. 1 noise): name -> (blocks, T', H', W') float32.

    Names are the experts (per_expert injection) or "fused"."""
    device = model.transformer.device
    x0 = batch["latents"].to(device) if "latents" in batch else model.encode_video(batch["frames"])
    text = batch["text_embeds"].to(device) if "text_embeds" in batch else model.text(batch["caption"])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device, x0.dtype)
    noisy = (1 - s) * x0 + s * noise
    condition = image = None
    if model.recipe.mode == "i2v":
        condition = batch["i2v_condition"] if "i2v_condition" in batch else model.i2v_condition(batch["frames"])
        image = batch.get("image_embeds", model.image_embeds(batch["frames"]) if "frames" in batch else None)
    model.adapter.record_maps(True)
    try:
        model.denoise(noisy, torch.full((x0.shape[0],), 1000.0 * s, device=device), text,
                      model.face_features(batch), condition, image)
        records = [layer.record for layer in model.adapter.layers]
    finally:
        model.adapter.record_maps(False)
    _, pt, ph, pw = (1, *model.transformer.config.patch_size)
    grid = (x0.shape[2] // pt, x0.shape[3] // ph, x0.shape[4] // pw)
    names = list(EXPERTS) if model.adapter.injection == "per_expert" else ["fused"]
    return {name: np.stack([r["contribution"][k][0].reshape(grid).cpu().numpy() for r in records])
            for k, name in enumerate(names)}


def face_share(heat: np.ndarray, box) -> tuple[float, float]:
    """(share of the map's mass inside `box`, share of the area inside it); box x0, y0, x1, y1 in [0, 1]
    of the map's frame. A map that looks at the face has the first well above the second."""
    h, w = heat.shape[-2:]
    ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
    inside = ((ys[:, None] >= box[1]) & (ys[:, None] <= box[3]) & (xs[None] >= box[0]) & (xs[None] <= box[2]))
    mass = heat.reshape(-1, h, w).sum(0)
    return float(mass[inside].sum() / max(mass.sum(), 1e-12)), float(inside.mean())


def fit_box(box, frame_width: int, frame_height: int, width: int, height: int) -> list[float]:
    """A face box (x0, y0, x1, y1 in [0, 1] of the source frame) in the frame the dataset feeds the VAE
    (`lafid.cofe.data.fit`: centre crop to width:height, then resize), clipped to [0, 1]."""
    scale = min(frame_width / width, frame_height / height)
    cw, ch = width * scale, height * scale
    dx, dy = (frame_width - cw) / 2, (frame_height - ch) / 2
    x0, y0, x1, y1 = np.asarray(box, np.float64) * [frame_width, frame_height, frame_width, frame_height]
    return [float(np.clip(v, 0, 1)) for v in ((x0 - dx) / cw, (y0 - dy) / ch, (x1 - dx) / cw, (y1 - dy) / ch)]


def overlay(frame: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """RGB frame with a (H', W') map laid over it (JET colours, normalised to its own maximum)."""
    h, w = frame.shape[:2]
    norm = heat / max(float(heat.max()), 1e-12)
    colour = cv2.applyColorMap((cv2.resize(norm, (w, h), interpolation=cv2.INTER_NEAREST) * 255).astype(np.uint8),
                               cv2.COLORMAP_JET)[..., ::-1]
    return (0.5 * frame + 0.5 * colour).astype(np.uint8)


def write_maps(maps: dict[str, np.ndarray], frames: np.ndarray, out: Path, prefix: str = "") -> list[Path]:
    """One PNG per map (averaged over blocks): each latent frame's map over its first source frame, side by side.
    `frames`: uint8 (T, H, W, 3) target frames; latent frame i covers source frames from i * T / T'."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, m in maps.items():
        mean = m.mean(0)  # (T', H', W')
        tiles = [overlay(frames[min(len(frames) - 1, i * len(frames) // len(mean))], mean[i]) for i in range(len(mean))]
        path = out / f"{prefix}{name}.png"
        cv2.imwrite(str(path), np.concatenate(tiles, axis=1)[..., ::-1])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    from lafid.cofe.api import reference_faces
    from lafid.cofe.checkpoint import checkpoint_recipe, checkpoint_weights
    from lafid.cofe.data import decode_frames, fit
    from lafid.video import probe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="a training checkpoint folder (recipe.json inside)")
    ap.add_argument("--video", required=True)
    ap.add_argument("--start", type=float, default=0.0, help="seconds; the reference face is this first frame's")
    ap.add_argument("--caption", default="a person talks")
    ap.add_argument("--noise", type=float, default=0.5, help="noise level s in [0, 1]")
    ap.add_argument("--out", type=Path, default=Path("cofe_maps"))
    ap.add_argument("--no-ema", action="store_true", help="the last trained weights, not their EMA")
    args = ap.parse_args(argv)

    recipe = checkpoint_recipe(args.checkpoint)
    torch.manual_seed(recipe.train.seed)  # as the trainer: parts built from a config get the same weights
    model = CoFEModel(recipe).eval()
    model.load_state_dict(checkpoint_weights(args.checkpoint, ema=not args.no_ema)[0], strict=False)
    d = recipe.data
    raw = decode_frames(args.video, args.start, probe(args.video).fps, d.num_frames, d.frame_stride)
    face, id_face = reference_faces(raw[0], d.face_size, d.face_margin)
    frames = np.stack([fit(f, d.width, d.height) for f in raw])
    batch = {"frames": torch.from_numpy(frames)[None], "caption": [args.caption],
             "face": torch.from_numpy(face)[None], "id_face": torch.from_numpy(id_face)[None],
             "has_id": torch.tensor([False]), "id_embedding": None}
    for path in write_maps(attention_maps(model, batch, args.noise), frames, args.out):
        print(path)


if __name__ == "__main__":
    main()
