"""Parquet output with exactly-once, resumable writes.

Rows are held per video until every clip of that video has arrived, then
buffered; a flush writes a clips shard and a rejects shard atomically (temp file,
then rename) with names derived from their content, and only then appends the
videos to `_manifest.jsonl`. A rerun reads the manifest, deletes shards no
manifest line names (left by a crash between write and record) and skips
finished videos, so every video ends in the output exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from lafid.item import Item
from lafid.schema import CLIP_SCHEMA, REJECT_SCHEMA, clip_row, reject_row, to_table

MANIFEST = "_manifest.jsonl"
STATS = "_stats.json"


def _digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


SHARD_PREFIXES = ("clips-", "rejects-")


def write_atomic(table, path: Path) -> None:
    """Write Parquet to a temporary name, then rename: readers never see half a file."""
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def read_manifest(out_dir: Path) -> list[dict]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash: its videos are redone
            continue
    return entries


@dataclass
class _Video:
    expected: int | None = None
    items: list[Item] = field(default_factory=list)


class ShardWriter:
    """Collects finished items and writes them as shards; see the module docstring."""

    def __init__(self, out_dir: str | Path, rows_per_shard: int = 1000):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        entries = read_manifest(self.out_dir)
        self.completed: set[str] = {v for e in entries for v in e["videos"]}
        self._remove_orphans({f for e in entries for f in e["files"]})
        self._open: dict[str, _Video] = defaultdict(_Video)
        self._ready: list[Item] = []
        self.counts: Counter[str] = Counter()

    def _remove_orphans(self, recorded: set[str]) -> None:
        for path in self.out_dir.iterdir():  # only shards: identities.parquet and user files stay
            if path.suffix == ".parquet" and path.name.startswith(SHARD_PREFIXES) and path.name not in recorded:
                path.unlink()

    def add(self, item: Item) -> bool:
        """Take one finished item; True when this completed its video."""
        video = self._open[item.video_id]
        video.expected = item.clip_count
        video.items.append(item)
        if len(video.items) < video.expected:
            return False
        del self._open[item.video_id]
        self._ready.extend(video.items)
        if sum(not i.rejected for i in self._ready) >= self.rows_per_shard:
            self.flush()
        return True

    def flush(self) -> None:
        if not self._ready:
            return
        items = sorted(self._ready, key=lambda i: (i.video_id, i.clip_index))
        kept = [clip_row(i) for i in items if not i.rejected]
        dropped = [reject_row(i) for i in items if i.rejected]
        files = []
        for prefix, rows, schema in (("clips", kept, CLIP_SCHEMA), ("rejects", dropped, REJECT_SCHEMA)):
            if rows:
                keys = [f"{r['video_id']}:{r['clip_index']}" for r in rows]
                name = f"{prefix}-{_digest(keys)}.parquet"
                write_atomic(to_table(rows, schema), self.out_dir / name)
                files.append(name)
        videos = sorted({i.video_id for i in items})
        entry = {"videos": videos, "files": files, "clips": len(kept), "rejects": len(dropped)}
        with open(self.out_dir / MANIFEST, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.completed.update(videos)
        self.counts.update(clips=len(kept), rejects=len(dropped), videos=len(videos))
        self._ready = []

    def close(self) -> None:
        """Flush what is buffered; videos still open (run cut short) are left to the rerun."""
        self.flush()

    @property
    def open_videos(self) -> list[str]:
        return sorted(self._open)
