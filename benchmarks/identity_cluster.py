"""Time and peak memory of `lafid identities` clustering (lafid.identity.cluster.cluster) on synthetic clips.

Synthetic reference embeddings, for timing only: `--n` clips of about
`--per-identity` clips per person, unit vectors around random person centres with
same-person cosine distance about 0.3 (different people about 1.0). Prints wall
time, peak resident memory of this process (the embeddings themselves included:
N x dim x 4 bytes, held once by the clustering), cluster count against the true person count, and clusters that
mix people. Baseline: with `--n <= --exact-max`, scipy's exact average linkage
(O(N^2) memory) on the same embeddings, and whether both partitions agree.

    python benchmarks/identity_cluster.py [--n 1000000] [--dim 512] [--per-identity 5] [--threshold 0.67]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafid.face.embed import unit  # noqa: E402
from lafid.identity.cluster import cluster  # noqa: E402
from lafid.stage import pin_native_threads  # noqa: E402


def synthetic(n: int, dim: int, per_identity: int, seed: int = 0, chunk: int = 8192):
    """(embeddings float32 (n, dim), person per row); built in chunks so only the result is resident."""
    rng = np.random.default_rng(seed)
    people = max(1, n // per_identity)
    centres = unit(rng.standard_normal((people, dim)).astype(np.float32))
    person = rng.integers(0, people, n)
    x = np.empty((n, dim), np.float32)
    spread = 0.65 / np.sqrt(dim)  # noise norm ~0.65: same-person cosine distance ~0.3
    for s in range(0, n, chunk):
        noise = rng.standard_normal((min(chunk, n - s), dim)).astype(np.float32) * spread
        x[s:s + chunk] = unit(centres[person[s:s + chunk]] + noise)
    return x, person


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--per-identity", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=0.67, help="cosine distance (ArcFace default)")
    ap.add_argument("--cell-size", type=int, default=1024)
    ap.add_argument("--probes", type=int, default=2)
    ap.add_argument("--passes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads")
    ap.add_argument("--exact-max", type=int, default=5000, help="largest --n checked against exact average linkage")
    args = ap.parse_args()
    pin_native_threads(args.threads)
    person = synthetic(args.n, args.dim, args.per_identity)[1]
    base = peak_mib()
    start, cpu = time.perf_counter(), time.process_time()
    # the embeddings are a temporary: cluster() copies them and frees the original
    labels = cluster(synthetic(args.n, args.dim, args.per_identity)[0], "cosine", args.threshold, args.cell_size,
                     args.probes, args.passes)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = peak_mib()
    found = np.unique(labels)
    mixed = sum(len(np.unique(person[labels == lab])) > 1 for lab in found) if args.n <= 200_000 else None
    print(f"{args.n} clips x {args.dim}-d, {len(np.unique(person))} people, threshold {args.threshold}, "
          f"cells of {args.cell_size}, {args.probes} probes, {args.passes} passes, {args.threads} BLAS threads")
    print(f"  average linkage (blocked, reciprocal NN): {wall:.1f} s wall ({cpu:.1f} s CPU), "
          f"{args.n / wall:,.0f} clips/s; "
          f"peak RSS {peak:,.0f} MiB (before clustering {base:,.0f} MiB; "
          f"the embeddings alone are {args.n * args.dim * 4 / 2**20:,.0f} MiB)")
    print(f"  {len(found)} clusters for {len(np.unique(person))} people"
          + ("" if mixed is None else f"; {mixed} clusters mix people"))
    if args.n <= args.exact_max:
        from scipy.cluster.hierarchy import fcluster, linkage

        start = time.perf_counter()
        x = synthetic(args.n, args.dim, args.per_identity)[0]
        exact = fcluster(linkage(x.astype(np.float64), method="average", metric="cosine"),
                         t=args.threshold, criterion="distance")
        print(f"  baseline scipy exact average linkage: {time.perf_counter() - start:.1f} s, "
              f"{len(np.unique(exact))} clusters; same partition: "
              f"{len(set(zip(labels, exact))) == len(found) == len(np.unique(exact))}")


if __name__ == "__main__":
    main()
