"""Live counters for a run: videos done, clips kept/rejected, per-stage rates, and what Ray did."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console
from rich.live import Live
from rich.table import Table

from lafid.item import Item
from lafid.stage import BatchStats


@dataclass
class RunInfo:
    """What the Ray executor did in one run (`run_ray` returns it; the runner keeps it in `RunStats.ray`)."""

    driver_bytes: int = 0  # bytes of summaries the driver received from actors
    row_bytes: int = 0  # of which output rows (columns of items going to the writer)
    summaries: int = 0
    items: int = 0  # items the summaries described
    restarted_videos: int = 0  # videos sent back to the first stage after their data was lost
    setup_s: float = 0.0  # wall seconds until every pool's first actors were set up (no work before that)
    peak_actors: dict[str, int] = field(default_factory=dict)
    retired: dict[str, int] = field(default_factory=dict)  # actors given back for being idle, per stage
    started: dict[str, int] = field(default_factory=dict)  # actors that set up, per stage
    startup_cpu_s: dict[str, float] = field(default_factory=dict)  # their CPU-seconds to start (imports, models)
    requests: dict[str, float] = field(default_factory=dict)  # CPUs per actor, as asked of Ray
    working_s: dict[int, float] = field(default_factory=dict)  # batches running at once -> seconds it lasted
    sizes: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (seconds into the run, actors per pool)


@dataclass
class RunStats:
    videos_total: int = 0
    videos_skipped: int = 0
    videos_done: int = 0
    kept: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    stages: dict[str, BatchStats] = field(default_factory=dict)  # totals per stage
    started: float = field(default_factory=time.perf_counter)
    native_log: str = ""  # where other code's output went (lafid.native)
    native_lines: int = 0  # lines written there during the run
    ray: RunInfo | None = None  # what the Ray executor did (None: the sequential runner)

    def stage(self, name: str, stats: BatchStats) -> None:
        self.stages.setdefault(name, BatchStats()).add(stats)

    def finished(self, item: Item) -> None:
        if item.rejected:
            self.rejected += 1
            self.reasons[f"{item.reject.stage}/{item.reject.reason}"] += 1
        else:
            self.kept += 1

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def videos_title(self) -> str:
        """Videos accounted for out of every input, those a resumed run found done included."""
        before = f" ({self.videos_skipped} done before this run)" if self.videos_skipped else ""
        return f"videos {self.videos_done + self.videos_skipped}/{self.videos_total}{before}"

    def table(self) -> Table:
        t = Table(title=f"{self.videos_title()}  clips kept {self.kept}  rejected {self.rejected}  "
                        f"{self.elapsed:.0f}s")
        for col in ("stage", "in", "out", "rejected", "items/s per worker"):
            t.add_column(col, justify="right" if col != "stage" else "left")
        for name, s in self.stages.items():
            rate = s.items_in / s.seconds if s.seconds else 0.0
            t.add_row(name, str(s.items_in), str(s.items_out), str(s.rejected), f"{rate:.2f}")
        return t


class ProgressDisplay:
    """Redraws the run table a few times a second on a terminal; silent otherwise.

    Transient: once the run ends the caller prints the final table once."""

    def __init__(self, console: Console, enabled: bool = True):
        self._live = Live(console=console, refresh_per_second=4, transient=True) if enabled else None

    def __enter__(self) -> "ProgressDisplay":
        if self._live:
            self._live.__enter__()
        return self

    def update(self, stats: RunStats) -> None:
        if self._live:
            self._live.update(stats.table())

    def __exit__(self, *exc) -> None:
        if self._live:
            self._live.__exit__(*exc)
