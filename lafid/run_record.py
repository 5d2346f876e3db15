"""The run record: one JSON line per `curate` run, appended to `_runs.jsonl` in the output folder.

It says what a run was (start time in UTC, recipe name and fingerprint, executor,
library versions) and how it went (outcome, wall time, counts), for `lafid report`
to read as data rather than parse from the log text. A run writes its line when it
ends, however it ends; a process killed outright writes none.
"""

from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lafid.progress import RunStats
from lafid.storage import append_line, read_json_lines

RUNS = "_runs.jsonl"
# Libraries whose versions can change what a run measures (decoding, face models, scheduling).
VERSIONS_OF = ("numpy", "pyarrow", "av", "opencv-python-headless", "mediapipe", "onnxruntime", "ray")


def read_runs(out_dir: str | Path) -> list[dict]:
    """The run records of an output folder, oldest first ([] when there are none)."""
    return read_json_lines(Path(out_dir) / RUNS)


def versions() -> dict[str, str]:
    """lafid's, Python's and the installed VERSIONS_OF libraries' versions."""
    from importlib.metadata import PackageNotFoundError, version

    from lafid import __version__

    found = {"lafid": __version__, "python": platform.python_version()}
    for name in VERSIONS_OF:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    return found


@contextmanager
def recording(out: Path, recipe: str, fingerprint: str, executor: str, stats: RunStats) -> Iterator[None]:
    """Append the run's record to `out`/RUNS when the block ends: `done`, `interrupted` (Ctrl-C) or
    `failed` (with the error), with the counts `stats` holds by then."""
    record = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "recipe": recipe,
              "fingerprint": fingerprint, "executor": executor, "versions": versions()}
    t0 = time.monotonic()
    try:
        yield
        record["outcome"] = "done"
    except KeyboardInterrupt:
        record["outcome"] = "interrupted"
        raise
    except BaseException as exc:
        record.update(outcome="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        record.update(wall_s=round(time.monotonic() - t0, 3), videos_total=stats.videos_total,
                      videos_skipped=stats.videos_skipped, videos_done=stats.videos_done, clips_kept=stats.kept,
                      rows_rejected=stats.rejected, native_lines=stats.native_lines)
        append_line(json.dumps(record, sort_keys=True), out / RUNS)
