"""`lafid` command line, one module per command group: curation (`curate`), a curate output (`data`),
CoFE training (`cofe`), LaFID-Bench (`bench`). `lafid generate` is kept as a spelling of `lafid bench generate`."""

from __future__ import annotations

import os
import shutil

import typer

from lafid.cli import bench, cofe, curate, data

# typer's help table cuts option names (--allow-recipe-chan…) below ~90 columns. typer reads TERMINAL_WIDTH when
# it first draws help; setting it here, not typer.rich_utils.MAX_WIDTH, keeps that import off every start-up.
os.environ.setdefault("TERMINAL_WIDTH", str(max(100, shutil.get_terminal_size().columns)))

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Curate pose-annotated, identity-stable face clips; inspect them; train CoFE on them.")
for group in (curate, data, cofe):
    app.add_typer(group.app)
app.add_typer(bench.app, name="bench")
aliases = typer.Typer()
aliases.command("generate", help="Same as `lafid bench generate` (this spelling is kept).")(bench.generate)
app.add_typer(aliases)
