"""Cross-clip identity clusters for `lafid identities DIR`.

Method: average linkage, merged by reciprocal nearest neighbours, blocked so it
scales to millions of clips on one machine. Two clusters merge only when the mean
squared distance over all their cross pairs is within the same-person radius
(cosine: exactly average linkage, since for unit vectors it is 2 x the mean cosine
distance; L2: root-mean-square linkage), so one look-alike pair cannot join two
people: A~B~C with A and C far apart ends as {A, B}, {C}. The mean over cross pairs
follows from each cluster's sum and mean squared norm, so a cluster costs one
vector. Rounds: every active cluster finds its nearest cluster; pairs that are each
other's nearest and within the radius merge. This linkage is reducible (a merged
cluster is never closer to a third than the nearer of its parts), so a cluster
whose nearest neighbour is beyond the radius never merges again and leaves the
rounds; with one cell this is exact average linkage (scipy's, checked in the
benchmark).

Candidates are blocked by an IVF-style coarse quantiser: k-means (Lloyd, trained
on a sample) splits the cluster means into cells of about `cell_size`; every
cluster joins its `probes` nearest cells and meets the clusters there. Further
passes (`passes`, 4 by default) re-block the surviving clusters with fresh
quantisers, so pairs split by a cell border meet. Cost is about N x cell_size x
probes^2 distance evaluations per round instead of N^2; memory is the embeddings
plus one cell's block (benchmarks/identity_cluster.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa

from lafid.face.embed import pairwise
from lafid.shards import read_clips
from lafid.schema import IDENTITY_SCHEMA
from lafid.shards import write_atomic

OUTPUT = "identities.parquet"


def kmeans(points: np.ndarray, k: int, iters: int = 10, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means from k random points, assignments by one matrix product per iteration; (k, D)."""
    rng = np.random.default_rng(seed)
    cent = points[rng.choice(len(points), k, replace=False)].copy()
    for _ in range(iters):
        near = np.argmin((cent * cent).sum(1)[None, :] - 2 * points @ cent.T, axis=1)
        sums = np.zeros_like(cent)
        np.add.at(sums, near, points)
        size = np.bincount(near, minlength=k)
        filled = size > 0  # an empty cell keeps its centroid
        cent[filled] = sums[filled] / size[filled, None]
    return cent


def nearest_cells(mean, n: int, cent: np.ndarray, probes: int, chunk: int = 16384) -> np.ndarray:
    """Indices (n, probes) of each row's nearest centroids; `mean(rows)` gives the rows' vectors."""
    out = []
    for s in range(0, n, chunk):
        d = pairwise("l2", mean(np.arange(s, min(s + chunk, n))), cent)
        near = np.argpartition(d, probes - 1, axis=1) if probes < d.shape[1] else np.argsort(d, axis=1)
        out.append(near[:, :probes].copy())  # a copy: a view would keep the whole chunk x cells block alive
    return np.concatenate(out)


def _nearest(mean, sqnorm: np.ndarray, cells: np.ndarray, k: int, chunk: int):
    """Each row's nearest other row (index, squared average-linkage distance) among rows sharing a cell;
    `mean(rows)` gives the rows' mean vectors (gathered per cell, never all at once)."""
    n = len(sqnorm)
    best_d, best_j = np.full(n, np.inf, np.float32), np.full(n, -1, np.int64)
    order = np.argsort(cells.ravel(), kind="stable")
    bounds = np.searchsorted(cells.ravel()[order], np.arange(k + 1))
    for c in range(k):
        members = np.unique(order[bounds[c]:bounds[c + 1]] // cells.shape[1])
        if len(members) < 2:
            continue
        cols = mean(members)
        for s in range(0, len(members), chunk):
            rows = members[s:s + chunk]
            d = sqnorm[rows, None] + sqnorm[None, members] - 2 * (cols[s:s + chunk] @ cols.T)
            d[np.arange(len(rows)), np.arange(s, s + len(rows))] = np.inf
            arg = np.argmin(d, axis=1)
            dist = d[np.arange(len(rows)), arg]
            better = dist < best_d[rows]
            best_d[rows[better]], best_j[rows[better]] = dist[better], members[arg[better]]
    return best_j, best_d


def cluster(embeddings: np.ndarray, metric: str, threshold: float, cell_size: int = 1024,
            probes: int = 2, passes: int = 4, chunk: int = 1024) -> np.ndarray:
    """Identity label per embedding: smallest row index of its average-linkage cluster."""
    x = np.array(embeddings, np.float32)  # a copy (its rows become cluster sums); a caller's temporary
    del embeddings                        # is freed here, so only one N x D array stays resident
    sq = np.einsum("ij,ij->i", x, x)  # per cluster: sum of squared norms of its members
    if metric == "cosine":  # unit vectors, in place; cosine distance t is squared L2 2t
        x /= np.maximum(np.sqrt(sq), 1e-12)[:, None]
        sq = np.einsum("ij,ij->i", x, x)
    radius2 = 2.0 * threshold if metric == "cosine" else float(threshold) ** 2
    n = len(x)
    count = np.ones(n, np.float32)
    parent = np.arange(n)
    for seed in range(passes):  # each pass blocks the surviving clusters with a fresh quantiser
        active = np.flatnonzero(parent == np.arange(n))
        k = max(1, int(np.ceil(len(active) / cell_size)))
        cent = None
        while len(active) > 1:
            def mean(rows, active=active):
                return x[active[rows]] / count[active[rows], None]

            def direction(rows):  # where a cluster is blocked: its mean, on the sphere for cosine
                m = mean(rows)
                return m / np.linalg.norm(m, axis=1, keepdims=True) if metric == "cosine" else m

            if cent is None and k > 1:  # trained on a sample of at most 64 clusters per cell
                sample = np.sort(np.random.default_rng(seed).choice(len(active), min(len(active), 64 * k), False))
                cent = kmeans(direction(sample), k, seed=seed)

            sqnorm = sq[active] / count[active]  # mean squared norm: D2(A,B) = QA + QB - 2 muA.muB
            cells = (np.zeros((len(active), 1), int) if k == 1
                     else nearest_cells(direction, len(active), cent, min(probes, k)))
            best_j, best_d = _nearest(mean, sqnorm, cells, k, chunk)
            mutual = (best_j >= 0) & (best_d <= radius2)
            mutual &= best_j[np.maximum(best_j, 0)] == np.arange(len(active))
            a = np.flatnonzero(mutual & (np.arange(len(active)) < best_j))
            if not len(a):
                break
            keep, gone = active[a], active[best_j[a]]
            x[keep] += x[gone]
            count[keep] += count[gone]
            sq[keep] += sq[gone]
            parent[gone] = keep
            still = best_d <= radius2  # beyond the radius now: beyond it for good (reducible linkage)
            still[best_j[a]] = False
            active = active[still]
        if k == 1:
            break  # unblocked: exact already
    while True:  # follow merges to each cluster's surviving row
        up = parent[parent]
        if np.array_equal(up, parent):
            break
        parent = up
    first = np.full(n, n)
    np.minimum.at(first, parent, np.arange(n))
    return first[parent]


def identities(out_dir: str | Path, threshold: float | None = None, cell_size: int = 1024,
               probes: int = 2) -> dict:
    """Cluster the reference embeddings of every clip in `out_dir`; write identities.parquet.

    Returns a summary: clips clustered, clips skipped (no embedding), backend,
    threshold and the sorted cluster sizes.
    """
    out_dir = Path(out_dir)
    table = read_clips(out_dir, columns=["clip_id", "video_id", "id_backend", "id_metric", "id_threshold",
                                                   "id_ref_embedding"])
    if table is None:
        raise FileNotFoundError(f"no clips-*.parquet shards in {out_dir}")
    emb_col = table["id_ref_embedding"].to_pylist()
    keep = [i for i, e in enumerate(emb_col) if e is not None]
    if not keep:
        raise ValueError(f"no clip in {out_dir} has id_ref_embedding: run the identity_consistency stage")
    backends = {table["id_backend"][i].as_py() for i in keep}
    if len(backends) > 1:
        raise ValueError(f"clips embedded by different backends {sorted(backends)} cannot be clustered together")
    backend = backends.pop()
    metric = table["id_metric"][keep[0]].as_py()
    threshold = threshold or round(min(table["id_threshold"][i].as_py() for i in keep), 6)  # stored as float32
    labels = cluster(np.array([emb_col[i] for i in keep], np.float32), metric, threshold, cell_size, probes)
    clip_ids = [table["clip_id"][i].as_py() for i in keep]
    video_ids = [table["video_id"][i].as_py() for i in keep]
    _, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    # An identity is named after its smallest clip id, so reruns on the same clips agree.
    first: dict[int, str] = {}
    for lab, cid in zip(inverse, clip_ids):
        first[lab] = min(first.get(lab, cid), cid)
    rows = [{"clip_id": cid, "video_id": vid, "identity_id": "id-" + hashlib.sha1(first[lab].encode()).hexdigest()[:12],
             "identity_size": int(sizes[lab])} for cid, vid, lab in zip(clip_ids, video_ids, inverse)]
    write_atomic(pa.Table.from_pylist(rows, schema=IDENTITY_SCHEMA), out_dir / OUTPUT)
    return {"clips": len(keep), "skipped": table.num_rows - len(keep), "backend": backend,
            "threshold": threshold, "sizes": sorted(sizes.tolist(), reverse=True)}
