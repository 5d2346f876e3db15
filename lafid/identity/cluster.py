"""Cross-clip identity clusters for `lafid identities DIR`.

Method (scales to millions of clips on one machine): blocking with an IVF-style
coarse quantiser. k-means (scipy's `kmeans2`, trained on a sample) splits the reference
embeddings into cells of about `cell_size`; every embedding joins its `probes`
nearest cells, so two close embeddings near a cell border still share one. Inside
each cell all pairs are compared exactly, in row chunks, and pairs within the
same-person distance are linked; connected components of those links over the
whole output are the identities (single linkage). Cost is about
N x cell_size x probes^2 distance evaluations instead of N^2, memory about
chunk x cell size. Single linkage can chain two people through look-alikes in
very large outputs: lower `threshold` to trade recall for purity.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
from scipy.cluster.vq import kmeans2
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lafid.face.embed import pairwise, unit
from lafid.report import read_table
from lafid.schema import IDENTITY_SCHEMA
from lafid.shards import write_atomic

OUTPUT = "identities.parquet"


def kmeans(x: np.ndarray, k: int, iters: int = 10, sample: int = 256, seed: int = 0) -> np.ndarray:
    """k-means++ seeded Lloyd (scipy) on at most `sample` points per centroid; returns (k, D) centroids."""
    rng = np.random.default_rng(seed)
    train = x[rng.choice(len(x), min(len(x), k * sample), replace=False)]
    cent, _ = kmeans2(train.astype(np.float64), k, iter=iters, minit="++", seed=seed)
    return cent.astype(np.float32)


def nearest_cells(x: np.ndarray, cent: np.ndarray, probes: int, chunk: int = 65536) -> np.ndarray:
    """Indices (N, probes) of each row's nearest centroids."""
    out = []
    for s in range(0, len(x), chunk):
        d = pairwise("l2", x[s:s + chunk], cent)
        out.append(np.argsort(d, axis=1)[:, :probes])
    return np.concatenate(out)


def _roots(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """For each node, the smallest node index of its connected component."""
    _, comp = connected_components(coo_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(n, n)),
                                   directed=False)
    first = np.full(comp.max() + 1, n)
    np.minimum.at(first, comp, np.arange(n))
    return first[comp]


def _cell_links(x: np.ndarray, members: np.ndarray, radius: float, chunk: int) -> np.ndarray:
    """Component root (global index) of each member within one cell, found chunk by chunk."""
    m = len(members)
    root = np.arange(m)
    for s in range(0, m, chunk):
        r, c = np.nonzero(pairwise("l2", x[members[s:s + chunk]], x[members]) <= radius)
        root = _roots(m, np.concatenate([r + s, np.arange(m)]), np.concatenate([c, root]))
    return members[root]


def cluster(embeddings: np.ndarray, metric: str, threshold: float, cell_size: int = 2048,
            probes: int = 2, chunk: int = 1024) -> np.ndarray:
    """Identity label per embedding: smallest row index of its same-person component."""
    x = np.asarray(embeddings, np.float32)
    # Work in L2 either way: for unit vectors cosine distance t equals L2 sqrt(2t).
    x, radius = (unit(x), float(np.sqrt(2 * threshold))) if metric == "cosine" else (x, threshold)
    n = len(x)
    k = max(1, int(np.ceil(n / cell_size)))
    cells = nearest_cells(x, kmeans(x, k), min(probes, k)) if k > 1 else np.zeros((n, 1), int)
    rows, cols = [np.arange(n)], [np.arange(n)]
    for c in range(k):
        members = np.flatnonzero((cells == c).any(1))
        if len(members) > 1:
            rows.append(members)
            cols.append(_cell_links(x, members, radius, chunk))
    return _roots(n, np.concatenate(rows), np.concatenate(cols))


def identities(out_dir: str | Path, threshold: float | None = None, cell_size: int = 2048,
               probes: int = 2) -> dict:
    """Cluster the reference embeddings of every clip in `out_dir`; write identities.parquet.

    Returns a summary: clips clustered, clips skipped (no embedding), backend,
    threshold and the sorted cluster sizes.
    """
    out_dir = Path(out_dir)
    table = read_table(out_dir, "clips", columns=["clip_id", "video_id", "id_backend", "id_metric", "id_threshold",
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
