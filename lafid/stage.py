"""The stage contract shared by the in-process and the Ray runner.

A stage declares what it needs (`resources`), loads its models in `setup()`
inside the worker that will run it, turns a batch of items into items in
`process()`, and frees what it holds in `teardown()`. Stages never import ray and
never import each other; the runners in `lafid.runner` are the only code that
knows how stages are scheduled.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from threadpoolctl import threadpool_limits

from lafid.item import Item
from lafid.schema import stored

_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage asks the scheduler for."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_gb: float = 0.0

    @property
    def threads(self) -> int:
        """Native thread pools are pinned to this many threads (at least one)."""
        return max(1, int(self.cpus))


class StageParams(BaseModel):
    """Base for a stage's recipe parameters: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage:
    """Base class for every curation stage.

    Subclasses set `name` and `Params`, and implement `process_item` (one item in,
    zero or more out) or override `process` for true batching.
    """

    name: ClassVar[str] = "stage"
    Params: ClassVar[type[StageParams]] = StageParams
    default_resources: ClassVar[Resources] = Resources()
    # The clip record this stage needs and adds: column names from `lafid.schema`,
    # and `Item.work` fields handed from stage to stage. `lafid.recipe` checks that
    # every read is written by an earlier stage of the recipe.
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    reads_work: ClassVar[tuple[str, ...]] = ()
    writes_work: ClassVar[tuple[str, ...]] = ()
    # Measure, then decide: `decide` (and `derive`) read only the clip's stored columns and the
    # THRESHOLDS params, so `lafid filter` replays them without decoding. MEASURE_PARAMS change what is
    # measured: a new value needs a new run. DECISIONS are the reason codes `decide` returns; any
    # other reject of the stage (decode errors, ...) means the clip was never fully measured.
    THRESHOLDS: ClassVar[frozenset[str]] = frozenset()
    MEASURE_PARAMS: ClassVar[frozenset[str]] = frozenset()
    DECISIONS: ClassVar[frozenset[str]] = frozenset()
    DECIDES_ON: ClassVar[tuple[str, ...]] = ()  # the columns `derive` and `decide` read

    def __init__(self, params: StageParams | dict[str, Any] | None = None,
                 resources: Resources | None = None):
        self.params = params if isinstance(params, StageParams) else self.Params(**(params or {}))
        self.resources = resources or self.default_resources

    def setup(self) -> None:
        """Load models; runs once in the worker, never in the driver."""

    def process(self, items: list[Item]) -> list[Item]:
        out: list[Item] = []
        for item in items:
            out.extend(self.process_item(item))
        return out

    def process_item(self, item: Item) -> list[Item]:
        raise NotImplementedError

    def derive(self, row: dict[str, Any]) -> dict[str, Any]:
        """Columns that follow from the measured ones and the thresholds (a label, its caption)."""
        return {}

    def decide(self, row: dict[str, Any]) -> tuple[str, str] | None:
        """(reason code, detail) to reject a measured clip, or None to keep it; `row` is the clip's
        columns plus `start_s` / `end_s`, as stored."""
        return None

    def conclude(self, item: Item) -> list[Item]:
        """Derive and decide on the item's columns as they will be stored (float32 rounding
        included), exactly as `lafid filter` does from the stored row."""
        row = self._stored_row(item)
        derived = self.derive(row)
        item.columns.update(derived)
        verdict = self.decide({**row, **derived})
        return [item.drop(self.name, *verdict) if verdict else item]

    def _stored_row(self, item: Item) -> dict[str, Any]:
        """The DECIDES_ON columns only (a decision that reads another fails here, in every run)."""
        row = {k: item.columns[k] for k in self.DECIDES_ON if k in item.columns}
        row.update(start_s=item.start_s, end_s=item.end_s)
        return {**row, **stored(row)}

    def teardown(self) -> None:
        """Release models and file handles."""


def pin_native_threads(threads: int) -> None:
    """Keep OpenCV/onnxruntime/torch pools to the CPUs the stage asked for (at load time;
    `StageWorker.run` also limits the BLAS/OpenMP pools already loaded, per batch)."""
    for key in _THREAD_ENV:
        os.environ[key] = str(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass
    torch = sys.modules.get("torch")  # a stage that imports torch later starts with OMP_NUM_THREADS threads;
    if torch is not None:  # importing it here would cost every actor ~2.5 CPU-s and ~200 MB
        torch.set_num_threads(threads)


@dataclass
class BatchStats:
    items_in: int = 0
    items_out: int = 0
    rejected: int = 0
    seconds: float = 0.0  # wall time of the calls
    cpu_seconds: float = 0.0  # CPU time of the worker's process during the calls (all its threads)

    def add(self, other: "BatchStats") -> None:
        self.items_in += other.items_in
        self.items_out += other.items_out
        self.rejected += other.rejected
        self.seconds += other.seconds
        self.cpu_seconds += other.cpu_seconds


def _localize(items: list[Item]) -> dict[str, str]:
    """Point items whose source is a URL at a local copy; returns local path -> URL. A copy that
    cannot be made leaves the URL, which the stage then rejects as unreadable."""
    from lafid.storage import is_url, local_copy

    back: dict[str, str] = {}
    for item in items:
        if is_url(item.source):
            url = item.source
            try:
                item.source = local_copy(url)
            except OSError:
                continue
            back[item.source] = url
    return back


class StageWorker:
    """Runs one stage on batches, isolating failures to the items that caused them.

    Both runners drive stages only through this class, so a stage behaves the same
    in a test, in the sequential runner and inside a Ray actor.
    """

    def __init__(self, stage: Stage, last: bool = False):
        self.stage = stage
        self.last = last  # the last stage drops working data instead of shipping it to the writer
        pin_native_threads(stage.resources.threads)
        stage.setup()

    def run(self, items: list[Item]) -> tuple[list[Item], BatchStats]:
        start, cpu_start = time.perf_counter(), time.process_time()
        urls = _localize(items)  # sources in object storage are read from a local copy
        live = [i for i in items if not i.rejected]
        passed = [i for i in items if i.rejected]
        # Per batch, not per process: in the sequential runner all stages share one process,
        # and results (e.g. Whisper's) depend on the OpenMP/BLAS thread count.
        with threadpool_limits(self.stage.resources.threads):
            out = self._process(live)
        for item in out:
            item.source = urls.get(item.source, item.source)
        if self.last:
            for item in out:
                item.work.clear()
        stats = BatchStats(
            items_in=len(live),
            items_out=sum(1 for i in out if not i.rejected),
            rejected=sum(1 for i in out if i.rejected),
            seconds=time.perf_counter() - start,
            cpu_seconds=time.process_time() - cpu_start,
        )
        return passed + out, stats

    def _process(self, live: list[Item]) -> list[Item]:
        try:
            return self.stage.process(live) if live else []
        except Exception:  # one bad item must not sink the batch: retry one by one
            out = []
            for item in live:
                try:
                    out.extend(self.stage.process([item]))
                except Exception as exc:  # noqa: BLE001 - reported as a reject row
                    detail = f"{type(exc).__name__}: {exc}"
                    tb = traceback.format_exc(limit=-2).strip().splitlines()
                    out.append(item.drop(self.stage.name, "stage_error", f"{detail} [{tb[-1] if tb else ''}]"))
            return out

    def close(self) -> None:
        self.stage.teardown()
