"""Files of an output folder: preflight, the run lock, atomic writes, stale temporaries.

Every file lafid writes into an output folder goes through here: Parquet and text
are written to a `.tmp-` name and renamed, so readers never see half a file; a run
holds an exclusive lock on the folder for its whole life, so two runs never write
into the same folder at once; and temporaries a crashed run left behind are
removed when the next run takes the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pyarrow.parquet as pq

LOCK = "_lock"
TMP_PREFIX = ".tmp-"


class OutputError(Exception):
    """An output folder that cannot be used; the message says which and why."""


class OutputBusy(OutputError):
    """Another run holds the output folder."""


def prepare_output(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` if needed and prove it is a writable folder, before any work."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"output {out} exists and is not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise OutputError(f"output {out} is not a folder")
    probe = out / f"{TMP_PREFIX}probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"lafid")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputError(f"output folder {out} is not writable: {why}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return out


class OutputLock:
    """An exclusive `fcntl` lock on `_lock` in the output folder, held until `release()`.

    The operating system drops the lock when the process dies, so a crashed run never
    leaves the folder locked."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusy(f"another lafid run (pid {holder}) is writing to {self.path.parent}; "
                             "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[str]:
    """Delete `.tmp-*` files a crashed run left; only call while holding the lock."""
    removed = []
    for path in Path(out_dir).glob(f"{TMP_PREFIX}*"):
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return sorted(removed)


def _tmp(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}")


def write_atomic(table, path: Path) -> None:
    """Write Parquet to a temporary name, then rename: readers never see half a file."""
    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    """Replace a text file as a whole (written, synced, then renamed)."""
    tmp = _tmp(path)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_line(line: str, path: Path) -> None:
    """Append one line and sync it: a crash loses at most this line."""
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())
