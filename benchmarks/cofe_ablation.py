"""Does CoFE read the face? Per-condition losses for fused and per-expert injection, CoFE only (no LoRA).

Six real people (the dev set's talkers and carphone), one clip each, all with the
same caption; the tiny recipe with the embedded ArcFace (w600k_mbf) as identity
expert. For each injection: train CoFE on precomputed samples, then print the
mean loss over fixed draws with the clip's own face (matched), another person's
(swapped), a grey face and no face (detached); see `lafid.cofe.probe`.

    python benchmarks/cofe_ablation.py                  # both injections, 3 seeds, 300 steps (CPU, minutes)
    python benchmarks/cofe_ablation.py --seeds 1 --injection per_expert --id-projection expand
    python benchmarks/cofe_ablation.py --injection fused --id-references 3   # 3 reference faces per sample
    python benchmarks/cofe_ablation.py --ablations --seeds 1   # drop-one-expert, uniform gate, small experts

`--ablations` trains, per seed and injection, the full model and each ablation of the
experts (`cofe.drop_experts`, `cofe.gate: uniform`, `cofe.expert_hidden`) and prints one
line per condition: matched / swapped / grey / detached losses, the swap gap, and the
mean gate weights (id / sem / det) on the matched faces.

One torch thread by default (`--threads`), as the test uses: float sums, and so
the printed losses, depend on the thread count.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from cofe_fixtures import SAME_CAPTION, identity_recipe, write_identity_shards  # noqa: E402

from lafid import devset  # noqa: E402
from lafid.cofe import probe  # noqa: E402
from lafid.cofe.data import ClipDataset  # noqa: E402
from lafid.cofe.model import CoFEModel  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--epochs", type=int, default=3, help="samples per clip (different windows / references)")
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3, help="training seeds per injection")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--injection", choices=["fused", "per_expert", "both"], default="both")
    ap.add_argument("--id-projection", choices=["resample", "expand"], default="expand")
    ap.add_argument("--id-references", type=int, default=1, help="ArcFace vectors per sample (data.id_references)")
    ap.add_argument("--ablations", action="store_true", help="one line per expert ablation (see above)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    root = devset.ensure()
    with tempfile.TemporaryDirectory(prefix="cofe-ablation-") as tmp:
        tmp = Path(tmp)
        _, rows = write_identity_shards(root, tmp)
        injections = ["fused", "per_expert"] if args.injection == "both" else [args.injection]
        print(f"{len(rows)} people, caption {SAME_CAPTION!r}; {args.steps} steps, lr {args.lr}, "
              f"{args.draws} fixed draws")
        conditions = ABLATIONS if args.ablations else {"full": {}}
        for injection in injections:
            for seed in range(args.seeds):
                for name, cofe in conditions.items():
                    recipe = identity_recipe(tmp / "shards", tmp / "out", injection=injection, seed=seed,
                                             id_projection=args.id_projection, id_references=args.id_references,
                                             **cofe)
                    run(name, recipe, args, seed, len(rows), line=args.ablations)


ABLATIONS = {"full": {}, "no identity": {"drop_experts": ["id"]}, "no semantic": {"drop_experts": ["sem"]},
             "no detail": {"drop_experts": ["det"]}, "uniform gate": {"gate": "uniform"},
             "expert_hidden 2": {"expert_hidden": 2}}


def run(name: str, recipe, args, seed: int, people: int, line: bool) -> None:
    """Train CoFE on precomputed samples and print the per-condition losses (one line when `line`)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = CoFEModel(recipe)
    ds = ClipDataset(recipe.data)
    samples = []
    for epoch in range(args.epochs):
        ds.set_position(epoch, 0)
        samples += list(ds)
    batches = probe.standardise(probe.precompute(model, samples, people))
    losses = probe.train(model, batches, args.steps, args.lr, seed=seed)
    result = probe.condition_losses(model, batches[0], draws=args.draws)
    gap = result["swapped"] - result["matched"]
    if line:
        probe.condition_loss(model, batches[0], "matched", draws=1)
        gates = model.adapter.gates().mean((0, 1)).tolist()
        print(f"{recipe.cofe.injection:<10} seed {seed} {name:<16} " + " ".join(
            f"{c} {v:.3f}" for c, v in result.items()) + f"  swap gap {gap:+.3f} ({gap / result['matched']:+.1%})"
              f"  gates {gates[0]:.2f}/{gates[1]:.2f}/{gates[2]:.2f}  {time.perf_counter() - start:.0f}s", flush=True)
        return
    print(f"\n{recipe.cofe.injection}, id_projection {args.id_projection}, id_references {args.id_references} "
          f"(seed {seed}): train loss {losses[0]:.3f} -> {sum(losses[-20:]) / 20:.3f}, "
          f"{time.perf_counter() - start:.0f}s")
    for condition, loss in result.items():
        print(f"  {condition:<9} {loss:.3f}")
    print(f"  swapped - matched {gap:+.3f} ({gap / result['matched']:+.1%})")

if __name__ == "__main__":
    main()
