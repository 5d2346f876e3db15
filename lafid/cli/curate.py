"""Curation commands: `curate`, `demo`, and the reference of what a recipe can say (`recipes`, `stages`,
`schema`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lafid.cli.common import _USER_OS_ERRORS, _exit_on, _quiet_native_logs, console
from lafid.recipe import RecipeError, describe, load_recipe

app = typer.Typer()


@app.command()
def curate(
    inputs: List[str] = typer.Argument(..., help="video files and/or folders (searched recursively)"),
    out: str = typer.Option(..., "--out", "-o", help="output folder for shards, rejects and manifest; "
                            "or s3://bucket/prefix, gs://..., file://..."),
    recipe: str = typer.Option("lafid180k", "--recipe", "-r", help="recipe path or bundled name"),
    address: Optional[str] = typer.Option(None, help="join this Ray cluster instead of starting a local one"),
    ray_token_file: Optional[Path] = typer.Option(None, "--ray-token-file",
                                                  help="with --address: a file holding the cluster's Ray auth "
                                                  "token (default: $RAY_AUTH_TOKEN)"),
    executor: str = typer.Option("ray", help="'ray' or 'sequential' (in-process, for debugging)"),
    num_cpus: Optional[int] = typer.Option(None, help="CPUs for a local Ray (default: all)"),
    progress: bool = typer.Option(True, help="live progress display"),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="redo videos with worker_crashed or stage_error rows, replacing their rows"),
    allow_recipe_change: bool = typer.Option(False, "--allow-recipe-change",
                                             help="add to an output folder written with a different recipe"),
) -> None:
    """Turn raw videos into Parquet shards of clips plus a ledger of rejects."""
    if ray_token_file is not None:
        with _exit_on(ValueError):
            _use_ray_token_file(ray_token_file, address)
    stats = _curate(recipe, inputs, out, address=address, executor=executor, num_cpus=num_cpus,
                    progress=progress, retry_failed=retry_failed, allow_recipe_change=allow_recipe_change)
    if stats.reasons:
        from lafid.report import count_table

        console.print(count_table("rejects by stage/reason", "stage/reason", stats.reasons))
    if stats.native_lines:
        console.print(f"native library messages: {stats.native_lines} lines in {stats.native_log}",
                      soft_wrap=True, markup=False, highlight=False)
    console.print(f"output: {out}")


def _use_ray_token_file(path: Path, address: Optional[str]) -> None:
    """Hand Ray the token file (it wins over $RAY_AUTH_TOKEN). Checked here: Ray aborts the
    process on a token file it cannot read."""
    if not address:
        raise ValueError("--ray-token-file is for --address; a local run makes its own token")
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read --ray-token-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise ValueError(f"--ray-token-file {path} is empty")
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path.resolve())


def _curate(recipe: str, inputs: List[str], out: Path | str, *, address: Optional[str], executor: str,
            num_cpus: Optional[int], progress: bool, retry_failed: bool = False,
            allow_recipe_change: bool = False):
    """Run a curation under the live display; prints the recipe used and the run's table."""
    from lafid.progress import ProgressDisplay
    from lafid.router import RunFailed, SetupFailed
    from lafid.runner import LOG, curate as run
    from lafid.storage import OutputError, is_url, refuse_if_busy

    _quiet_native_logs()

    if not is_url(str(out)):
        with _exit_on(OutputError):
            refuse_if_busy(out)
    with _exit_on(RecipeError):
        parsed = load_recipe(recipe)
        console.print(describe(recipe), soft_wrap=True, markup=False, highlight=False)
    with ProgressDisplay(console, enabled=progress and console.is_terminal) as display:
        with _exit_on(RecipeError, OutputError, SetupFailed):
            try:
                stats = run(parsed, inputs, out, executor=executor, address=address, num_cpus=num_cpus,
                            on_update=display.update, retry_failed=retry_failed,
                            allow_recipe_change=allow_recipe_change)
            except (RecipeError, OutputError, SetupFailed):
                raise
            except KeyboardInterrupt:  # finished videos are recorded; the rest is redone by a rerun
                console.print("interrupted; rerun to resume")
                raise typer.Exit(130) from None
            except OSError as exc:
                if exc.errno not in _USER_OS_ERRORS:
                    raise
                raise OutputError(f"cannot write to {out}: {exc.strerror} ({exc.filename or out})") from None
            except Exception as exc:  # the full traceback is in the run's log
                what = str(exc) if isinstance(exc, RunFailed) else f"{type(exc).__name__}: {exc}"
                console.print(f"[red]error:[/red] {what} (full traceback: {str(out).rstrip('/')}/{LOG})")
                raise typer.Exit(1) from None
    console.print(stats.table())
    return stats


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), "--out", "-o", help="output folder"),
    executor: str = typer.Option("ray", help="'ray' or 'sequential'"),
    num_cpus: int = typer.Option(2, help="CPUs for the local Ray"),
) -> None:
    """Make sample footage from real media, curate it on a local Ray with the demo recipe, inspect it."""
    from lafid.media import make_sample_set

    inputs = make_sample_set(str(out / "input"))
    _curate("demo", inputs, out / "shards", address=None, executor=executor, num_cpus=num_cpus, progress=True)
    from lafid.report import summary

    console.print(summary(out / "shards"))  # counts, reject reasons, poses, speaking labels: shown once, here


@app.command()
def recipes() -> None:
    """List the bundled recipes: curation (for `curate`) and training (for `train`)."""
    import yaml

    from lafid.recipe import bundled_names, resolve

    names = bundled_names()
    width = max(map(len, names))
    for name in names:
        data = yaml.safe_load(resolve(name).read_text())
        kind = "curation" if "stages" in data else "training"
        typer.echo(f"{name:<{width}}  {kind:<8}  {data.get('description', '')}")


@app.command()
def stages() -> None:
    """Every stage with its recipe parameters, defaults and meaning (Markdown)."""
    from lafid.registry import STAGES, stage_class

    for name in STAGES:
        cls = stage_class(name)
        about = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or name).strip().splitlines()[0]
        typer.echo(f"\n#### `{name}`\n\n{about}\n")
        typer.echo("| param | default | meaning |\n|---|---|---|")
        for key, field in cls.Params.model_fields.items():
            typer.echo(f"| `{key}` | `{field.default}` | {field.description or ''} |")


@app.command()
def schema() -> None:
    """Every Parquet column with its type and meaning (Markdown)."""
    from lafid.schema import CLIP_SCHEMA, IDENTITY_SCHEMA, REJECT_SCHEMA

    for title, sch in (("clips-*.parquet", CLIP_SCHEMA), ("rejects-*.parquet", REJECT_SCHEMA),
                       ("identities.parquet", IDENTITY_SCHEMA)):
        typer.echo(f"\n#### `{title}`\n\n| column | type | meaning |\n|---|---|---|")
        for f in sch:
            typer.echo(f"| `{f.name}` | `{f.type}` | {(f.metadata or {}).get(b'doc', b'').decode()} |")
