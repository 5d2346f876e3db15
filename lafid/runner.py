"""Run a recipe over source videos: sequentially in-process, or on Ray.

Both executors feed the same `StageWorker`s, send rejected items straight to the
writer, and hand every finished item to one `ShardWriter`, so their outputs are
the same rows. `lafid.ray_executor` is the only module that imports ray.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lafid.item import Item
from lafid.progress import RunStats
from lafid.recipe import Recipe
from lafid.shards import ShardWriter
from lafid.stage import StageWorker
from lafid.video import content_id

# Folder scans list files with these extensions: video containers and audio
# containers (an audio-only file becomes a `no_video_stream` reject row rather than
# being skipped unseen). Files given by name are attempted whatever their extension.
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".divx", ".flv", ".f4v", ".wmv", ".asf",
    ".mpg", ".mpeg", ".m2v", ".vob", ".ts", ".mts", ".m2ts", ".m2t", ".3gp", ".3g2", ".ogv", ".mxf",
    ".dv", ".rm", ".rmvb", ".y4m", ".h264", ".264", ".h265", ".265", ".hevc",
    ".m4a", ".mp3", ".wav", ".aac", ".flac", ".ogg", ".oga", ".opus", ".wma", ".mka", ".weba",
    ".amr", ".aif", ".aiff",
})


def list_sources(inputs: Iterable[str]) -> list[str]:
    """Absolute paths of the sources to curate, each once, in a stable order.

    A file given by name is listed whatever its extension, even when it is missing
    or unreadable (it becomes a reject row). A folder is searched recursively for
    files with a media extension (`VIDEO_EXTENSIONS`), following symlinked folders;
    a folder already searched (by its real path) is not searched again, so symlink
    loops end."""
    out: list[str] = []
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()

    def add(path: str) -> None:
        path = os.path.abspath(path)
        if path not in seen_files:
            seen_files.add(path)
            out.append(path)

    for entry in inputs:
        if os.path.isdir(entry):
            for path in _scan(entry, seen_dirs):
                add(path)
        else:
            add(entry)
    return out


def _scan(folder: str, seen_dirs: set[str]) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        found.extend(os.path.join(root, name) for name in files
                     if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS)
    return sorted(found)


def source_items(sources: list[str], writer: ShardWriter, stats: RunStats) -> Iterator[Item]:
    """One item per new video. Finished videos (resume) are skipped; a second file with
    the same content becomes a `duplicate_content` reject, so the ledger explains it."""
    first_path: dict[str, str] = {}
    for source in sources:
        video_id = content_id(source)
        if video_id in first_path:
            path_key = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:8]
            duplicate_id = f"{video_id}~{path_key}"
            if duplicate_id in writer.completed:
                stats.videos_skipped += 1
            else:
                yield Item(source=source, video_id=duplicate_id).drop(
                    "input", "duplicate_content", f"same content as {first_path[video_id]}")
            continue
        first_path[video_id] = source
        if video_id in writer.completed:
            stats.videos_skipped += 1
        else:
            yield Item(source=source, video_id=video_id)


@dataclass
class Sink:
    """Where finished items go: the writer, the run counters and the display."""

    writer: ShardWriter
    stats: RunStats
    on_update: Callable[[RunStats], None] | None = None

    def put(self, item: Item) -> bool:
        self.stats.finished(item)
        done = self.writer.add(item)
        if done:
            self.stats.videos_done += 1
        if self.on_update:
            self.on_update(self.stats)
        return done


def run_sequential(recipe: Recipe, items: Iterable[Item], sink: Sink) -> None:
    """Every stage in this process, depth first: each batch goes all the way to the
    writer before the next is started, so memory does not grow with video length."""
    stages = recipe.build_stages()
    workers = [StageWorker(stage, last=i == len(stages) - 1) for i, stage in enumerate(stages)]

    def push(pending: list[Item], level: int) -> None:
        spec, worker = recipe.stages[level], workers[level]
        for start in range(0, len(pending), spec.batch_size):
            out, stats = worker.run(pending[start:start + spec.batch_size])
            sink.stats.stage(spec.stage, stats)
            onward = []
            for item in out:
                if item.rejected or level + 1 == len(workers):
                    sink.put(item)
                else:
                    onward.append(item)
            if onward:
                push(onward, level + 1)

    try:
        for video in items:
            push([video], 0)
    finally:
        for worker in workers:
            worker.close()


def curate(
    recipe: Recipe,
    inputs: Iterable[str],
    out_dir: str | os.PathLike,
    executor: str = "ray",
    address: str | None = None,
    num_cpus: int | None = None,
    on_update: Callable[[RunStats], None] | None = None,
) -> RunStats:
    """Curate `inputs` into `out_dir`; resumable and idempotent (see lafid.shards)."""
    writer = ShardWriter(out_dir, recipe.output.rows_per_shard)
    sources = list_sources(inputs)
    stats = RunStats(videos_total=len(sources))
    sink = Sink(writer, stats, on_update)
    items = source_items(sources, writer, stats)
    if executor == "sequential":
        run_sequential(recipe, items, sink)
    elif executor == "ray":
        from lafid.ray_executor import run_ray

        run_ray(recipe, items, sink, address=address, num_cpus=num_cpus)
    else:
        raise ValueError(f"unknown executor {executor!r}: use 'ray' or 'sequential'")
    writer.close()
    return stats
