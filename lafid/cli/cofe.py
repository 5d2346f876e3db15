"""CoFE commands: `train` and `cache` (see docs/cofe.md)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer

from lafid.cli.common import _exit_on, console
from lafid.recipe import RecipeError, describe

app = typer.Typer()


@app.command()
def train(
    recipe: str = typer.Option(..., "--recipe", "-r", help="CoFE recipe path or bundled name (cofe_tiny)"),
    steps: Optional[int] = typer.Option(None, help="train up to this optimizer step (default: the recipe's)"),
    resume: bool = typer.Option(True, help="continue from the newest finished checkpoint in train.output_dir"),
    progress: bool = typer.Option(True, help="progress bar"),
    exclude: List[Path] = typer.Option([], "--exclude", help="bench folder whose identities are held out (repeatable)"),
    plan: bool = typer.Option(False, "--plan", help="print the per-GPU memory estimate and exit (loads nothing)"),
    gpus: int = typer.Option(1, "--gpus", min=1, help="GPU count for --plan"),
    gpu_mem: float = typer.Option(80.0, "--gpu-mem", help="GiB per GPU for --plan's verdict"),
) -> None:
    """Train CoFE (face experts fusion on a Wan DiT) on clip shards; see docs/cofe.md."""
    from lafid.cofe.config import load_cofe_recipe

    with _exit_on(RecipeError, FileNotFoundError):
        parsed = load_cofe_recipe(recipe)
        console.print(describe(recipe), soft_wrap=True, markup=False, highlight=False)
        if plan:
            from lafid.cofe.plan import plan as memory_plan

            typer.echo(memory_plan(parsed, gpus).table(gpu_mem))
            return
        _require_shards(recipe, parsed.data.shards)
    from lafid.cofe.train import main

    log = Path(parsed.train.output_dir) / WARNINGS_LOG
    logged = log.stat().st_size if log.exists() else 0
    with _exit_on(RecipeError, FileNotFoundError), _warnings_to(log):
        result = main(recipe, resume=resume, steps=steps, progress=progress,
                      exclude=[str(p) for p in exclude])
    from accelerate import PartialState

    if not PartialState().is_main_process:  # one summary per run (the loss is already the mean over ranks)
        return
    loss = f"last loss {result.losses[-1]:.4f}, " if result.losses else ""
    console.print(f"step {result.steps}: {loss}{result.clips} clips in {result.seconds:.1f}s; "
                  f"checkpoint {result.checkpoint}")
    if log.exists() and log.stat().st_size > logged:
        console.print(f"warnings (from dependencies): {log}", soft_wrap=True, markup=False, highlight=False)


@app.command()
def cache(
    recipe: str = typer.Option(..., "--recipe", "-r", help="CoFE recipe path or bundled name"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="cache folder (default: the recipe's data.cache)"),
    shard_size: int = typer.Option(64, min=1, help="clips per cache file"),
    progress: bool = typer.Option(True, help="progress bar"),
) -> None:
    """Precompute VAE latents, text embeddings and expert features per clip for `train` (resumable;
    several processes under `accelerate launch` split the clips)."""
    from lafid.cofe.config import load_cofe_recipe

    with _exit_on(RecipeError, FileNotFoundError):
        parsed = load_cofe_recipe(recipe)
        console.print(describe(recipe), soft_wrap=True, markup=False, highlight=False)
        _require_shards(recipe, parsed.data.shards)
        if out is None and parsed.data.cache is None:
            raise RecipeError(f"recipe {recipe} has no data.cache: set it (training reads the cache there) or pass --out")
    from accelerate import PartialState

    from lafid.cofe.precompute import build_cache

    state = PartialState()
    folder = out or parsed.data.cache
    with _exit_on(RecipeError, FileNotFoundError, ValueError):
        result = build_cache(parsed, folder, shard_size=shard_size, rank=state.process_index,
                             world_size=state.num_processes, device=str(state.device),
                             progress=progress and state.is_main_process)
    console.print(f"cached {result.clips} clips in {result.parts} files ({result.skipped} cached before) "
                  f"in {result.seconds:.1f}s: {folder}", soft_wrap=True, markup=False, highlight=False)


WARNINGS_LOG = "warnings.log"


def _require_shards(recipe: str, sources: List[str]) -> None:
    """Fail before any model is built when a folder of `data.shards` is missing or holds no clip shards."""
    from lafid.shards import shards_missing
    from lafid.storage import is_url

    for source in sources:
        path, problem = shards_missing(source)
        if problem is None:
            continue
        how = f"`lafid curate VIDEOS --out {path}`"
        if not is_url(str(source)) and Path(path).name == "shards":
            how = f"`lafid demo --out {Path(path).parent}` (sample footage) or {how}"
        raise FileNotFoundError(f"no clip shards for recipe {recipe}: data.shards entry {source!r} ({path}) "
                                f"{problem}; make them with {how}, or point data.shards at a curate output")


class _Once(logging.Filter):
    """Passes a record only if its text is not in the log file yet: once per run, across the
    DataLoader worker processes that every epoch forks anew (each would warn again)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not (self.path.exists() and text in self.path.read_text(errors="replace"))


@contextmanager
def _warnings_to(log: Path):
    """Python warnings (a dependency's FutureWarning and the like) go to `log`, each once, not to the
    terminal where they would break the progress bar."""
    log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    handler.addFilter(_Once(log))
    logger = logging.getLogger("py.warnings")
    propagate = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        logger.removeHandler(handler)
        logger.propagate = propagate
        handler.close()
