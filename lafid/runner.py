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

VIDEO_EXTENSIONS = {".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv"}


def list_sources(inputs: Iterable[str]) -> list[str]:
    """Files as given (even missing ones: they become reject rows); folders searched for videos."""
    out: list[str] = []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            out.extend(str(p) for p in sorted(path.rglob("*")) if p.suffix.lower() in VIDEO_EXTENSIONS)
        else:
            out.append(str(path))
    return out


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
