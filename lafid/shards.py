"""Parquet output with exactly-once, resumable writes, and the one reader of an output.

The router hands over a video only when all its rows are in; they are buffered,
and a flush writes a clips shard and a rejects shard atomically (see
`lafid.storage`) with names derived from their content, and only then appends the
videos to `_manifest.jsonl`. A rerun reads the manifest, deletes shards no
manifest line names (left by a crash between write and record) and skips
finished videos, so every video ends in the output exactly once. Each manifest
line records the fingerprint of the recipe that wrote it and its stages with every
parameter (what `lafid filter` checks a new recipe against). Redoing a finished
video (`retry_failed`) replaces its rows: the manifest is then rewritten as a
whole (temp file, rename) with the old rows out and the new ones in.

Readers find an output's shards with `shard_files` and read them with `read_clips`, through
`lafid.storage.filesystem` (local folders and object-storage URLs alike).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from lafid.item import Item
from lafid.schema import CLIP_SCHEMA, REJECT_SCHEMA, clip_row, reject_row
from lafid.storage import (MANIFEST_NAME as MANIFEST, OutputError, append_line, filesystem, read_manifest, write_atomic,
                           write_text_atomic)

__all__ = ["MANIFEST", "RETRYABLE", "RecipeChanged", "ShardWriter", "find_shards", "read_clips", "read_manifest",
           "shard_files", "shards_missing", "write_atomic"]

KINDS = {"clips": CLIP_SCHEMA, "rejects": REJECT_SCHEMA}
SHARD_PREFIXES = tuple(f"{kind}-" for kind in KINDS)
SHARD_GLOBS = tuple(f"{prefix}*.parquet" for prefix in SHARD_PREFIXES)
# Reject reasons that say the run failed, not the media: `--retry-failed` redoes their videos.
RETRYABLE = ("worker_crashed", "stage_error")


class RecipeChanged(OutputError):
    """The output folder was written with another recipe."""


def _digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:16]


def _shard_name(prefix: str, rows: list[dict]) -> str:
    keys = [f"{r['video_id']}:{r['clip_index']}" for r in rows]
    return f"{prefix}-{_digest(keys)}.parquet"


class ShardWriter:
    """Collects finished videos and writes them as shards; see the module docstring."""

    def __init__(self, out_dir: str | Path, rows_per_shard: int = 1000, recipe: str | None = None,
                 allow_recipe_change: bool = False, stages: list | None = None):
        self.out_dir = Path(out_dir)
        self.stages = stages  # the recipe's [stage, params] in order, kept with each entry for `lafid filter`
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.recipe = recipe
        entries = read_manifest(self.out_dir)
        written_with = {e["recipe"] for e in entries if e.get("recipe")}
        if recipe and written_with and recipe not in written_with and not allow_recipe_change:
            raise RecipeChanged(f"{self.out_dir} was written with another recipe (fingerprint "
                                f"{', '.join(sorted(written_with))}, now {recipe}); use another --out, "
                                "or --allow-recipe-change to add to it anyway")
        self.completed: set[str] = {v for e in entries for v in e["videos"]}
        self.remove_unrecorded()
        self._ready: list[Item] = []
        self.retrying: set[str] = set()  # finished videos this run redoes (see retry_failed)
        self.counts: Counter[str] = Counter()
        self.on_flush: Callable[[], None] | None = None  # called after each flush is recorded
        # Called with a flush's kept rows once its shards are written; returns more files
        # (written atomically) for the same manifest line, e.g. an export's tar shard.
        self.extra_files: Callable[[list[dict]], list[str]] | None = None

    def remove_unrecorded(self, patterns: Sequence[str] = SHARD_GLOBS) -> None:
        """Delete the files matching `patterns` that no manifest line names: written by a run that died
        before recording them (by default shards only: identities.parquet and user files stay)."""
        recorded = {f for e in read_manifest(self.out_dir) for f in e["files"]}
        for pattern in patterns:
            for path in self.out_dir.glob(pattern):
                if path.name not in recorded:
                    path.unlink()

    def add_video(self, items: list[Item]) -> None:
        """Take every row of one finished video."""
        self._ready.extend(items)
        if sum(not i.rejected for i in self._ready) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._ready:
            return
        items = sorted(self._ready, key=lambda i: (i.video_id, i.clip_index))
        videos = sorted({i.video_id for i in items})
        redone = self.retrying.intersection(videos)
        if redone:  # their old rows come out first, under new shard names, still unrecorded
            entries, stale = self._without(redone)
        kept = [clip_row(i) for i in items if not i.rejected]
        dropped = [reject_row(i) for i in items if i.rejected]
        files = [self._write_shard(prefix, pa.Table.from_pylist(rows, schema=schema))
                 for prefix, rows, schema in (("clips", kept, CLIP_SCHEMA), ("rejects", dropped, REJECT_SCHEMA)) if rows]
        if self.extra_files:
            files += self.extra_files(kept)
        self._record(videos, files, len(kept), len(dropped), entries if redone else None, stale if redone else set())
        self._ready = []

    def add_tables(self, clips: pa.Table, rejects: pa.Table) -> None:
        """Write whole videos given as tables in the shard schemas (`lafid filter`), sorted by video and
        clip and cut into shards of about `rows_per_shard` clips at video boundaries."""
        self.flush()
        clips, rejects = (t.sort_by([("video_id", "ascending"), ("clip_index", "ascending")]) for t in (clips, rejects))
        kept_ids, dropped_ids = clips["video_id"].to_pylist(), rejects["video_id"].to_pylist()
        videos = sorted(set(kept_ids) | set(dropped_ids))
        kept_at, dropped_at = Counter(kept_ids), Counter(dropped_ids)
        start, n, a, b = 0, 0, 0, 0
        for i, video in enumerate(videos):
            n += kept_at[video]
            if n < self.rows_per_shard and i + 1 < len(videos):
                continue
            chunk = videos[start:i + 1]
            na, nb = sum(kept_at[v] for v in chunk), sum(dropped_at[v] for v in chunk)
            files = [self._write_shard(prefix, t.slice(at, count)) for prefix, t, at, count
                     in (("clips", clips, a, na), ("rejects", rejects, b, nb)) if count]
            if self.extra_files:
                files += self.extra_files(clips.slice(a, na).to_pylist())
            self._record(chunk, files, na, nb)
            start, n, a, b = i + 1, 0, a + na, b + nb

    def _write_shard(self, prefix: str, table: pa.Table) -> str:
        name = _shard_name(prefix, table.select(["video_id", "clip_index"]).to_pylist())
        write_atomic(table, self.out_dir / name)
        return name

    def _record(self, videos: list[str], files: list[str], clips: int, rejects: int,
                entries: list[dict] | None = None, stale: set[str] = frozenset()) -> None:
        """Append the flush to the manifest, or with `entries` (a redo) replace the manifest."""
        redone = self.retrying.intersection(videos)
        entry = {"videos": videos, "files": files, "clips": clips, "rejects": rejects,
                 "recipe": self.recipe, **({"stages": self.stages} if self.stages else {})}
        if entries is not None:  # one atomic manifest replacement: old rows out, new rows in
            entries.append(entry)
            write_text_atomic("".join(json.dumps(e) + "\n" for e in entries), self.out_dir / MANIFEST)
            recorded = {f for e in entries for f in e["files"]}
            for name in stale - recorded:
                (self.out_dir / name).unlink(missing_ok=True)
            self.retrying -= redone
        else:
            append_line(json.dumps(entry), self.out_dir / MANIFEST)
        self.completed.update(videos)
        self.counts.update(clips=clips, rejects=rejects, videos=len(videos))
        if self.on_flush:
            self.on_flush()

    def close(self) -> None:
        """Flush what is buffered."""
        self.flush()

    def failed_videos(self) -> set[str]:
        """Finished videos with a row that says the run failed them (`RETRYABLE` reasons)."""
        failed: set[str] = set()
        for entry in read_manifest(self.out_dir):
            for name in entry["files"]:
                if name.startswith("rejects-"):
                    table = pq.read_table(self.out_dir / name, columns=["video_id", "reason"])
                    failed.update(v for v, r in zip(table["video_id"].to_pylist(), table["reason"].to_pylist())
                                  if r in RETRYABLE)
        return failed

    def retry_failed(self) -> int:
        """Redo the finished videos that `failed_videos()` names, if this run is given them:
        they count as not done, and when a video's new rows are flushed its old rows are
        removed in the same manifest replacement. Videos not given keep their rows."""
        self.retrying = self.failed_videos()
        self.completed -= self.retrying
        return len(self.retrying)

    def _without(self, videos: set[str]) -> tuple[list[dict], set[str]]:
        """Manifest entries with `videos` taken out: shards holding them are rewritten without
        their rows under new content names (unrecorded until the manifest is replaced).
        Returns the entries and the shard files they no longer need."""
        stale: set[str] = set()
        out = []
        for entry in read_manifest(self.out_dir):
            if not videos.intersection(entry["videos"]):
                out.append(entry)
                continue
            files, counts = [], {}
            for name in entry["files"]:
                table = pq.read_table(self.out_dir / name)
                rows = [r for r in table.to_pylist() if r["video_id"] not in videos]
                prefix = name.split("-", 1)[0]
                counts[prefix] = len(rows)
                stale.add(name)
                if rows:
                    files.append(self._write_shard(prefix, pa.Table.from_pylist(rows, schema=table.schema)))
            left = [v for v in entry["videos"] if v not in videos]
            if left:
                out.append({**entry, "videos": left, "files": files,
                            "clips": counts.get("clips", 0), "rejects": counts.get("rejects", 0)})
        return out, stale


# --- reading an output -----------------------------------------------------------------------

def shard_files(out: str | os.PathLike, kind: str | None = "clips", recorded: bool = False) -> list[str]:
    """An output's `kind` shards ("clips", "rejects"; None: both), sorted paths in its filesystem
    (`lafid.storage.filesystem`; local ones absolute): every `<kind>-*.parquet` of the folder, or with
    `recorded` only those its manifest names (a local folder); [] when there is no such folder."""
    fs, path = filesystem(out)
    prefixes = SHARD_PREFIXES if kind is None else (f"{kind}-",)
    if recorded:
        names = {f for e in read_manifest(Path(path)) for f in e["files"]}
        return sorted(f"{path}/{n}" for n in names if n.startswith(prefixes) and n.endswith(".parquet"))
    found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)) \
        if fs.get_file_info(path).type == pafs.FileType.Directory else []
    return sorted(f.path for f in found if f.type == pafs.FileType.File and f.base_name.startswith(prefixes)
                  and f.base_name.endswith(".parquet"))


def read_clips(out: str | os.PathLike, columns: list[str] | None = None, kind: str = "clips",
               recorded: bool = False) -> pa.Table | None:
    """The rows of an output's `kind` shards (`shard_files`) as one table, only `columns` when given; None
    when there are none. Read in the current schema: shards of an older schema version read with the
    columns they lack as null."""
    files = shard_files(out, kind, recorded)
    if not files:
        return None
    fs, _ = filesystem(out)
    return ds.dataset(files, format="parquet", schema=KINDS[kind], filesystem=fs).to_table(columns=columns)


def shards_missing(source: str | os.PathLike) -> tuple[str, str | None]:
    """(path inside its filesystem, why a folder or shard file gives no clip shards: "does not exist",
    "holds no clips-*.parquet"; None when it gives some)."""
    fs, path = filesystem(source)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        return path, "does not exist"
    if kind == pafs.FileType.Directory and not shard_files(source):
        return path, "holds no clips-*.parquet"
    return path, None


def find_shards(sources: Sequence[str | os.PathLike]) -> tuple[pafs.FileSystem, list[str]]:
    """(filesystem, clip shard paths) of folders (`shard_files`) or shard files, local or URLs, all on one
    filesystem; raises FileNotFoundError when there is none."""
    files: list[str] = []
    fs = None
    for source in sources:
        fs_, path = filesystem(source)
        if fs is not None and fs_.type_name != fs.type_name:
            raise ValueError("all shards must live on one filesystem")
        fs = fs_
        files += shard_files(source) if fs.get_file_info(path).type == pafs.FileType.Directory else [path]
    if not files:
        raise FileNotFoundError(f"no clips-*.parquet under {[str(s) for s in sources]}")
    return fs, files
