"""Which training clips a bench holds out: `lafid train --exclude BENCH` (or the recipe's
`data.exclude`) drops every clip that

- belongs to a bench identity (`split.parquet`, by clip id),
- comes from a video that holds a bench clip (by video id), or
- shows a bench person: its reference embedding lies within the same-person distance of a
  bench clip's reference embedding (same identity backend only). This catches the same
  person in shards curated separately, whose identity clusters were named independently.

It lives under `cofe` (training reads it); `lafid.bench.build` writes the split file it reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow.parquet as pq

from lafid.face.embed import pairwise

SPLIT = "split.parquet"
COLUMNS = ["clip_id", "video_id", "id_backend", "id_ref_embedding"]  # training-shard columns the check reads


class Exclusion:
    def __init__(self, benches: Sequence[str | Path]):
        self.clips: set[str] = set()
        self.videos: set[str] = set()
        self.embeddings: dict[str, list[np.ndarray]] = {}
        self.threshold: dict[str, float] = {}
        for bench in benches:
            path = Path(bench) / SPLIT
            if not path.exists():
                raise FileNotFoundError(f"{bench}: no {SPLIT}; make the bench with `lafid bench build`")
            for r in pq.read_table(path).to_pylist():
                if r["split"] != "bench":
                    continue
                self.clips.add(r["clip_id"])
                self.videos.add(r["video_id"])
                if r["id_ref_embedding"] and r["id_backend"]:
                    self.embeddings.setdefault(r["id_backend"], []).append(np.asarray(r["id_ref_embedding"], np.float32))
                    self.threshold[r["id_backend"]] = min(self.threshold.get(r["id_backend"], np.inf),
                                                          float(r["id_threshold"]))

    def keep(self, table) -> np.ndarray:
        """Boolean mask over the rows of a clip table (needs the columns it has of `COLUMNS`)."""
        cols = set(table.column_names)
        n = table.num_rows
        keep = np.ones(n, bool)
        if "clip_id" in cols:
            keep &= ~np.isin(np.asarray(table["clip_id"].to_pylist(), object), list(self.clips))
        if "video_id" in cols:
            keep &= ~np.isin(np.asarray(table["video_id"].to_pylist(), object), list(self.videos))
        if {"id_backend", "id_ref_embedding"} <= cols:
            backends = table["id_backend"].to_pylist()
            embs = table["id_ref_embedding"].to_pylist()
            for backend, bench in self.embeddings.items():
                rows = [i for i in range(n) if keep[i] and backends[i] == backend and embs[i]]
                if rows:
                    metric = "cosine" if backend.startswith("arcface") else "l2"
                    d = pairwise(metric, np.array([embs[i] for i in rows], np.float32), np.stack(bench))
                    keep[np.asarray(rows)[d.min(1) <= self.threshold[backend]]] = False
        return keep
