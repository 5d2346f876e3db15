"""Do the per-expert attention maps look at the face? Identity-only training, then map mass in the face box.

The six real people of `benchmarks/cofe_ablation.py` (one caption, CoFE only, the
embedded ArcFace, `id_projection: expand`), trained the same way; then, for each clip of the evaluation
batch, `lafid.cofe.maps.attention_maps` (noise level 0.5) and `maps.face_share`:
the share of each map's mass inside the clip's median face box, beside the share
of the frame that box covers. A map that looks at the face has the first well
above the second. Run for each injection with and without `cofe.null_key`.

`--queries` also asks whether the frozen backbone's own cross-attention queries
tell face tokens from the rest at all: a logistic regression on each block's
queries (noise level 0.5), trained on five people and scored on the sixth
(balanced accuracy; 0.5 = chance). Face attention is a function of those
queries, so a map cannot single out the face where they do not.

    python benchmarks/cofe_maps.py                          # fused and per_expert, null key off and on, 2 seeds
    python benchmarks/cofe_maps.py --seeds 1 --injection per_expert --queries
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cofe_fixtures import SAME_CAPTION, identity_recipe, write_identity_shards  # noqa: E402

from lafid import devset  # noqa: E402
from lafid.cofe import probe  # noqa: E402
from lafid.cofe.data import ClipDataset  # noqa: E402
from lafid.cofe.maps import attention_maps, face_share, fit_box  # noqa: E402
from lafid.cofe.model import CoFEModel  # noqa: E402


def median_box(row: dict, width: int, height: int) -> list[float]:
    return fit_box(np.median(np.asarray(row["frame_box"]), 0), row["width"], row["height"], width, height)


def map_shares(model: CoFEModel, batch: dict, rows: dict) -> dict[str, tuple[float, float]]:
    """Per map name: (mean share of mass inside the face box, mean share of the frame it covers) over clips."""
    d = model.recipe.data
    out: dict[str, list] = {}
    for i, clip in enumerate(batch["clip_id"]):
        one = {k: (v[i:i + 1] if torch.is_tensor(v) else [v[i]] if isinstance(v, list) else v)
               for k, v in batch.items()}
        for name, m in attention_maps(model, one).items():
            out.setdefault(name, []).append(face_share(m.mean(0), median_box(rows[clip], d.width, d.height)))
    return {k: (float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v]))) for k, v in out.items()}


@torch.no_grad()
def query_features(model: CoFEModel, batches: list[dict], rows: dict, s: float = 0.5):
    """Per block: (queries (N, tokens, D), face labels (N, tokens), person per sample) at noise level s."""
    queries: dict[int, list] = {}
    hooks = [b.attn2.register_forward_hook(
        lambda m, args, out, i=i: queries.setdefault(i, []).append(m.norm_q(m.to_q(args[0]))))
        for i, b in enumerate(model.transformer.blocks)]
    labels, people = [], []
    _, pt, ph, pw = (1, *model.transformer.config.patch_size)
    try:
        for b in batches:
            x0 = b["latents"]
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
            model.denoise((1 - s) * x0 + s * noise, torch.full((x0.shape[0],), 1000.0 * s), b["text_embeds"], None)
            t, h, w = x0.shape[2] // pt, x0.shape[3] // ph, x0.shape[4] // pw
            ys, xs = (np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w
            for clip in b["clip_id"]:
                x0_, y0_, x1_, y1_ = median_box(rows[clip], model.recipe.data.width, model.recipe.data.height)
                inside = (ys[:, None] >= y0_) & (ys[:, None] <= y1_) & (xs[None] >= x0_) & (xs[None] <= x1_)
                labels.append(np.tile(inside.reshape(-1), t))
                people.append(clip)
    finally:
        for hook in hooks:
            hook.remove()
    y = torch.tensor(np.stack(labels), dtype=torch.float32)
    return {i: torch.cat(q) for i, q in queries.items()}, y, people


def balanced_accuracy(pred: torch.Tensor, truth: torch.Tensor) -> float:
    return float(0.5 * ((pred & truth).sum() / truth.sum() + (~pred & ~truth).sum() / (~truth).sum()))


def query_probe(x: torch.Tensor, y: torch.Tensor, people: list[str], steps: int = 300) -> tuple[float, float]:
    """Leave-one-person-out logistic regression face vs not, on queries: (held-out, training) balanced accuracy."""
    held_out, train = [], []
    for person in sorted(set(people)):
        tr = torch.tensor([p != person for p in people])
        xt, yt = x[tr].flatten(0, 1), y[tr].flatten()
        w = torch.zeros(x.shape[-1], requires_grad=True)
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=1e-2)
        balance = (1 - yt.mean()) / yt.mean()
        for _ in range(steps):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, pos_weight=balance)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            held_out.append(balanced_accuracy(x[~tr].flatten(0, 1) @ w + b > 0, y[~tr].flatten() > 0))
            train.append(balanced_accuracy(xt @ w + b > 0, yt > 0))
    return float(np.mean(held_out)), float(np.mean(train))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, default=2, help="training seeds per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--injection", choices=["fused", "per_expert", "both"], default="both")
    ap.add_argument("--queries", action="store_true", help="also probe the backbone's queries for the face")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = devset.ensure()
    with tempfile.TemporaryDirectory(prefix="cofe-maps-") as tmp:
        tmp = Path(tmp)
        _, rows = write_identity_shards(root, tmp)
        by_id = {r["clip_id"]: r for r in rows}
        injections = ["fused", "per_expert"] if args.injection == "both" else [args.injection]
        print(f"{len(rows)} people, caption {SAME_CAPTION!r}; {args.steps} steps, lr {args.lr}")
        for seed in range(args.seeds):
            for injection in injections:
                for null_key in (False, True):
                    recipe = identity_recipe(tmp / "shards", tmp / "out", injection=injection, seed=seed,
                                             null_key=null_key, id_projection="expand")
                    start = time.perf_counter()
                    torch.manual_seed(seed)
                    model = CoFEModel(recipe)
                    ds = ClipDataset(recipe.data)
                    samples = []
                    for epoch in range(3):
                        ds.set_position(epoch, 0)
                        samples += list(ds)
                    batches = probe.standardise(probe.precompute(model, samples, len(rows)))
                    if args.queries and not null_key and injection == injections[0]:
                        x, y, who = query_features(model, batches, by_id)
                        for block, q in x.items():
                            held, fit = query_probe(q, y, who)
                            print(f"seed {seed} block {block} queries: face vs rest, balanced accuracy "
                                  f"{held:.2f} on an unseen person ({fit:.2f} on the five trained on)")
                    probe.train(model, batches, args.steps, args.lr, seed=seed)
                    losses = {c: probe.condition_loss(model, batches[0], c) for c in ("matched", "swapped")}
                    shares = map_shares(model, batches[0], by_id)
                    area = next(iter(shares.values()))[1]
                    print(f"seed {seed} {injection:<10} null_key {str(null_key):<5} matched {losses['matched']:.3f} "
                          f"swapped {losses['swapped']:.3f}; map mass in face box (area {area:.3f}): "
                          + ", ".join(f"{k} {v[0]:.3f}" for k, v in shares.items())
                          + f" ({time.perf_counter() - start:.0f}s)", flush=True)


if __name__ == "__main__":
    main()
