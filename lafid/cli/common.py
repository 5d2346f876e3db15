"""What every `lafid` command shares: the stderr console, one-line user errors, quiet native libraries."""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.markup import escape

console = Console(stderr=True)


@contextmanager
def _exit_on(*errors: type[Exception]):
    """Show a user's mistake (bad recipe, missing input) as one red line and exit 2, no traceback."""
    try:
        yield
    except errors as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(2) from None


# Errors of the machine the user can fix (disk full, read-only, permissions): one line, exit 2.
_USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _quiet_native_logs() -> None:
    from lafid.native import NATIVE_QUIET_ENV

    for key, value in NATIVE_QUIET_ENV.items():
        os.environ.setdefault(key, value)
    logging.getLogger("absl").setLevel(logging.ERROR)
