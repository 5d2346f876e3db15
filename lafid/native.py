"""Keep the terminal for lafid's own lines: what other code prints goes to `_native.log`.

Native libraries (libav's swscaler and decoders, TFLite/mediapipe `W0000` lines, glog)
write straight to file descriptor 2, below anything Python can filter; dependencies
warn through Python's `warnings`, log through loggers lafid does not own, or print
(Ray's driver prints raylet messages such as OOM kills to stdout). Both executors
run under `native_output_to`; Ray actors point their own stderr at the same file
(`stderr_to`).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator

NATIVE_LOG = "_native.log"
# Native libraries' own logging (mediapipe/TFLite glog, TensorFlow) turned down in every process that runs stages.
NATIVE_QUIET_ENV = {"GLOG_minloglevel": "2", "TF_CPP_MIN_LOG_LEVEL": "2"}


def stderr_to(path: str) -> None:
    """Send this process's stderr (file descriptor 2) to `path`, for good (a Ray actor's whole life)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)


def _on_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # a capture buffer (tests, CliRunner) has no descriptor
        return False


@contextmanager
def native_output_to(path: str) -> Iterator[None]:
    """For the duration, descriptors 1 and 2, `sys.stdout`, Python warnings and the records of loggers
    without a handler go to `path` (appended). `sys.stderr` keeps writing to the terminal through a
    copy of descriptor 2: lafid's console and progress display write there, nothing else does."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None: no console at all (pythonw, some daemons)
            stream.flush()
    log = open(path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    previous = sys.stdout, sys.stderr, warnings.showwarning, logging.lastResort
    terminal = None
    if _on_fd(sys.stderr, 2):
        terminal = io.TextIOWrapper(io.FileIO(saved[2], "w", closefd=False), encoding=sys.stderr.encoding,
                                    errors=sys.stderr.errors, line_buffering=True, write_through=True)
        sys.stderr = terminal
    sys.stdout = log
    for fd in (1, 2):
        os.dup2(log.fileno(), fd)

    def show(message, category, filename, lineno, file=None, line=None):
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show
    last_resort = logging.StreamHandler(log)
    last_resort.setLevel(logging.WARNING)
    logging.lastResort = last_resort
    try:
        yield
    finally:
        log.flush()
        sys.stdout, sys.stderr, warnings.showwarning, logging.lastResort = previous
        for fd in (1, 2):
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
        if terminal is not None:
            terminal.flush()
        log.close()


def lines_since(path: str, offset: int) -> int:
    """Lines written to `path` after byte `offset`."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            return sum(1 for _ in fh)
    except OSError:
        return 0


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
