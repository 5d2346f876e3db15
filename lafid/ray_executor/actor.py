"""What runs inside a stage's actor process: `StageActor`, and nothing of the driver's.

A Ray worker imports this module (and the package's `__init__`, which defers the driver's names) to
build its actor. It imports only the stage contract, items and the native-log redirect: every module
here is paid for once per actor, before the stage does any work (the driver's router, shard writer
and progress display cost each actor ~0.25 CPU-s of pandas, pyarrow.dataset and rich imports)."""

from __future__ import annotations

import os
import tempfile
import time
import traceback

from lafid.item import Item
from lafid.native import NATIVE_LOG, stderr_to
from lafid.stage import Stage, StageWorker


def item_key(item: Item) -> tuple[str, int]:
    """What names an item between pools: its video and clip index."""
    return item.video_id, item.clip_index


def _stub(item: Item, full: bool) -> Item:
    """What the driver needs of an item: its key and reject, and its output row only if `full`."""
    return Item(source=item.source, video_id=item.video_id, clip_index=item.clip_index,
                clip_count=item.clip_count, start_s=item.start_s, end_s=item.end_s,
                columns=dict(item.columns) if full else {}, reject=item.reject)


class StageActor:
    """Runs one stage, or a chain of consecutive stages, in a Ray worker process; set up once, then called
    with batches. A chain hands each stage's items to the next in memory (`pools: chain`)."""

    def __init__(self, stages: list[Stage], last: bool, native_log: str | None = None):
        self.workers: list[StageWorker] = []
        self.error: tuple[str, str, str] | None = None  # (stage, error, traceback) of a stage that failed to set up
        self.setup_cpu_s = 0.0
        if native_log:
            try:
                stderr_to(native_log)
            except OSError:  # the output folder is not on this node: the node's temp folder
                stderr_to(os.path.join(tempfile.gettempdir(), "lafid", NATIVE_LOG))
        for i, stage in enumerate(stages):
            try:
                self.workers.append(StageWorker(stage, last and i == len(stages) - 1))
            except Exception as exc:  # reported by ready(): the driver fails the run with it
                self.error = (stage.name, f"{type(exc).__name__}: {exc}", traceback.format_exc())
                break
        self.setup_cpu_s = time.process_time()  # the process's start, imports and models: what an actor costs

    def ready(self) -> tuple[tuple[str, str, str] | None, float]:
        """(None once the stages are set up, otherwise (stage, error, traceback); CPU-seconds the process took
        to start)."""
        return self.error, self.setup_cpu_s

    def run(self, direct: list[Item], picks: list[list[tuple[str, int]]], *parts: list[Item]):
        """Run the stage(s) on `direct` items plus, from each earlier pool's output `parts[i]`, the items
        keyed `picks[i]`. Returns (the items, for the next pool; a small summary, for the driver: each
        stage's (name, BatchStats) and the items' stubs)."""
        items = list(direct)
        for keys, part in zip(picks, parts):
            wanted = set(keys)
            items.extend(i for i in part if item_key(i) in wanted)
        stats = []
        for worker in self.workers:  # a stage passes the items rejected before it through untouched
            items, batch = worker.run(items)
            stats.append((worker.stage.name, batch))
        full = self.workers[-1].last
        return items, (stats, [_stub(i, full or i.rejected) for i in items])

    def close(self) -> None:
        for worker in self.workers:
            worker.close()


def actor_class(name: str) -> type:
    """`StageActor` under its pool's name: Ray titles an actor's process by its class (`ray::shot_split`
    in `ps`, `ray::shot_split.run` while it works; `ray::chain` for a whole chain)."""
    return type(name, (StageActor,), {"__module__": __name__, "__qualname__": name})
