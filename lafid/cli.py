"""`lafid` command line: curate, inspect, demo (and the training/identity tools)."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lafid.recipe import RecipeError, describe, load_recipe

if not os.environ.get("TERMINAL_WIDTH"):  # typer's help table cuts option names (--allow-recipe-chan…) below ~90
    from typer import rich_utils

    rich_utils.MAX_WIDTH = max(100, shutil.get_terminal_size().columns)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Curate pose-annotated, identity-stable face clips; inspect them; train CoFE on them.")
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
def inspect(out: Path = typer.Argument(..., help="a curate output folder")) -> None:
    """Counts, reject reasons and the pose histogram of a curate output."""
    from lafid.report import summary

    with _exit_on(FileNotFoundError):
        console.print(summary(out))


@app.command()
def export(
    out: Path = typer.Argument(..., help="a curate output folder"),
    to: str = typer.Option(..., "--to", help="export folder (created; resumable), or s3://bucket/prefix, gs://..."),
    fmt: str = typer.Option("mp4", "--format", help="'mp4' (one file per clip) or 'webdataset' (tar shards)"),
    max_side: int = typer.Option(720, help="downscale so the longer side is at most this (0: source size)"),
    crop: str = typer.Option("none", help="'none' or 'face' (a square around the clip's face boxes)"),
    samples_per_shard: int = typer.Option(100, help="webdataset: samples per tar (closed at a video boundary)"),
    jobs: int = typer.Option(1, help="clips cut at once (FFmpeg processes)"),
) -> None:
    """Cut every kept clip to an H.264 MP4 with its audio, plus the clip rows as Parquet; see docs/export.md."""
    from lafid.export import export as run
    from lafid.storage import OutputError

    with _exit_on(FileNotFoundError, OutputError, ValueError):
        stats = run(out, to, fmt=fmt, max_side=max_side, crop=crop, samples_per_shard=samples_per_shard,
                    jobs=jobs)
    console.print(f"exported {stats.clips} clips of {stats.videos} videos ({stats.failed} failed, "
                  f"{stats.skipped_videos} videos already done) to {to}")


@app.command()
def report(
    outputs: List[Path] = typer.Argument(..., help="a curate output folder; two or more are compared side by side"),
    html: Path = typer.Option(Path("report.html"), "--out", "-o", help="the HTML file to write"),
    png_dir: Optional[Path] = typer.Option(None, help="also write every plot and face crop as PNG files here"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="also write the report's numbers as JSON here"),
    faces: int = typer.Option(6, help="face crops per pose bucket on the contact sheet"),
) -> None:
    """One self-contained HTML page: pose, clips, identity, speech, reject funnel, faces, run facts."""
    from lafid.report_html import report as make

    with _exit_on(FileNotFoundError):
        runs = make(outputs, html, png_dir=png_dir, json_path=json_path, per_bucket=faces)
    for run in runs:
        c = run.stats["counts"]
        console.print(f"{run.label}: {c['input_videos']} videos, {c['clips_kept']} clips kept, "
                      f"{c['clips_rejected'] + c['videos_rejected']} rejects")
    console.print(f"report: {html}")


@app.command("filter")
def filter_(
    output: Path = typer.Argument(..., help="a curate output folder"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="recipe path or bundled name: thresholds may differ"),
    out: Path = typer.Option(..., "--out", "-o", help="the new output folder"),
) -> None:
    """Decide every clip again with another recipe's thresholds, from the stored measurements (no decoding)."""
    from lafid.filter import filter_output
    from lafid.storage import OutputError

    with _exit_on(RecipeError, OutputError, FileNotFoundError):
        parsed = load_recipe(recipe)
        stats = filter_output(output, parsed, out)
    console.print(f"{stats.videos} videos: {stats.kept} clips kept, {stats.rejected} rejects "
                  f"({stats.changed} decided differently)")
    if stats.unmeasured:
        console.print(f"{stats.unmeasured} clips stay rejected: an earlier recipe rejected them before a stage "
                      "they would now reach measured them (curate again to measure them)")
    if stats.skipped:
        console.print(f"{stats.skipped} videos were already in {out}")
    console.print(f"output: {out}")


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
    inspect(out / "shards")  # counts, reject reasons, poses, speaking labels: shown once, here


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


@app.command()
def identities(
    out: Path = typer.Argument(..., help="a curate output folder (clips-*.parquet)"),
    threshold: Optional[float] = typer.Option(None, help="same-person distance; default: the backend's own"),
    cell_size: int = typer.Option(1024, help="clips per k-means blocking cell"),
    probes: int = typer.Option(2, help="nearest cells each clip joins"),
) -> None:
    """Cluster clips by the identity of their reference face; writes identities.parquet."""
    from collections import Counter

    from rich.table import Table

    from lafid.identity.cluster import OUTPUT, identities as run

    with _exit_on(FileNotFoundError, ValueError):
        s = run(out, threshold=threshold, cell_size=cell_size, probes=probes)
    table = Table(title=f"{len(s['sizes'])} identities over {s['clips']} clips "
                        f"({s['backend']}, threshold {s['threshold']:g}; {s['skipped']} clips without embedding)")
    table.add_column("clips per identity", justify="right")
    table.add_column("identities", justify="right")
    for size, count in sorted(Counter(s["sizes"]).items(), reverse=True):
        table.add_row(str(size), str(count))
    console.print(table)
    console.print(f"output: {out / OUTPUT}")


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


bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="LaFID-Bench: build cases from shards, score videos per face pose (docs/bench.md).")
app.add_typer(bench_app, name="bench")


@bench_app.command("build")
def bench_build(
    shards: List[Path] = typer.Argument(..., help="curate output folders (with identities.parquet)"),
    out: Path = typer.Option(..., "--out", "-o", help="bench folder to write"),
    per_bucket: int = typer.Option(20, help="cases per pose bucket (at most)"),
    seed: int = typer.Option(0, help="seed of the identity draw"),
    max_identity_share: float = typer.Option(0.2, help="largest share of identities held out for the bench"),
    min_bucket_share: float = typer.Option(0.25, help="share of face frames a non-frontal bucket needs to name a clip"),
) -> None:
    """Pick identity-disjoint cases stratified by pose bucket; writes cases, split and reference faces."""
    from lafid.bench.build import BenchError, build

    with _exit_on(BenchError, FileNotFoundError):
        info = build(shards, out, per_bucket=per_bucket, seed=seed, max_identity_share=max_identity_share,
                     min_bucket_share=min_bucket_share)
    per = ", ".join(f"{b} {n}" for b, n in info["cases_per_bucket"].items())
    console.print(f"{info['cases']} cases ({per}) from {info['bench_identities']} of {info['identities']} identities; "
                  f"{info['bench_clips']} clips held out of training (`lafid train --exclude {out}`)")
    if info["cases_without_prompt"]:
        console.print(f"{info['cases_without_prompt']} cases have no caption (curated without speech_disambiguation): "
                      "their prompt is empty and CLIPScore skips them")
    console.print(f"output: {out}")


@bench_app.command("eval")
def bench_eval(
    bench: Path = typer.Argument(..., help="a bench folder (lafid bench build)"),
    videos: Optional[Path] = typer.Argument(None, help="folder of <case_id>.mp4 (lafid generate)"),
    out: Path = typer.Option(..., "--out", "-o", help="results folder"),
    real: bool = typer.Option(False, "--real", help="score the real target clips instead of VIDEOS"),
    protocol: str = typer.Option("lafid", help="lafid (corrected) or consisid (public ConsisID/OpenS2V choices)"),
    frames: int = typer.Option(16, help="frames sampled evenly per video"),
    arcface_dir: Optional[Path] = typer.Option(None, help="insightface pack (antelopev2/buffalo_l); default embedded w600k_mbf"),
    curricular: Optional[Path] = typer.Option(None, help="CurricularFace IR-101 weights file (FaceSim-Cur)"),
    clip_dir: Optional[Path] = typer.Option(None, help="local CLIP model directory (CLIPScore)"),
    fid_min_crops: int = typer.Option(500, help="face crops each side below which FID is null (lafid protocol)"),
) -> None:
    """FaceSim-Arc/Cur, CLIPScore, FID and face detection rate per pose bucket; JSON, Markdown and PNG."""
    from lafid.bench.evaluate import CHART, RESULTS_JSON, RESULTS_MD, evaluate

    _quiet_native_logs()
    with _exit_on(FileNotFoundError, ValueError):
        result = evaluate(bench, out, videos=videos, real=real, protocol=protocol, frames=frames,
                          arcface_dir=arcface_dir, curricular=curricular, clip_dir=clip_dir,
                          fid_min_crops=fid_min_crops, on_case=lambda r: console.print(f"{r['case_id']} [{r['pose_bucket']}] faces "
                                                          f"{r['faces']}/{r['frames']} FaceSim-Arc "
                                                          f"{r['facesim_arc']:.3f}", highlight=False))
    typer.echo((out / RESULTS_MD).read_text())
    if result["missing_videos"]:
        console.print(f"{len(result['missing_videos'])} cases had no video (scored 0)")
    console.print(f"output: {out / RESULTS_JSON}, {out / RESULTS_MD}, {out / CHART}")


@app.command()
def generate(
    bench: Path = typer.Argument(..., help="a bench folder (lafid bench build)"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for <case_id>.mp4"),
    recipe: str = typer.Option(..., "--recipe", "-r", help="the CoFE recipe the checkpoint was trained with"),
    checkpoint: Path = typer.Option(..., help="a `lafid train` checkpoint-N folder (ema.safetensors or "
                                                            "trainable.safetensors)"),
    model_dir: Optional[Path] = typer.Option(None, help="local diffusers Wan pipeline folder; default: the recipe's parts"),
    frames: int = typer.Option(17, help="frames per video (Wan: 4k+1)"),
    height: int = typer.Option(480),
    width: int = typer.Option(832),
    steps: int = typer.Option(30, help="denoising steps"),
    guidance: float = typer.Option(5.0, help="classifier-free guidance scale (text)"),
    face_guidance: Optional[float] = typer.Option(
        None, help="classifier-free guidance scale of the face, over the face-dropped branch (train.face_drop); "
                   "0: the model without the face; default: the face in every branch, text guidance only"),
    seed: int = typer.Option(0),
    fps: float = typer.Option(16.0, help="frame rate written to the mp4"),
    device: Optional[str] = typer.Option(None, help="torch device (cuda, cuda:1, cpu); default: cuda when present"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="the checkpoint's EMA weights (ema.safetensors) when it "
                                                         "has them, or its last trained weights"),
) -> None:
    """One mp4 per bench case from a Wan pipeline with the trained CoFE attached; skips cases already written."""
    from rich.progress import Progress

    from lafid.bench.generate import GenerateSettings, generate as run
    from lafid.cofe.config import load_cofe_recipe

    _quiet_native_logs()
    with _exit_on(RecipeError, FileNotFoundError):
        load_cofe_recipe(recipe)
    settings = GenerateSettings(num_frames=frames, height=height, width=width, steps=steps, guidance=guidance,
                                seed=seed, fps=fps, ema=ema, face_guidance=face_guidance,
                                device=device)
    from lafid.bench.build import load_cases

    with _exit_on(FileNotFoundError):
        total = len(load_cases(bench))
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("generate", total=total)
        with _exit_on(RecipeError, FileNotFoundError, ValueError):
            done = run(bench, out, recipe, checkpoint, model_dir=model_dir, settings=settings,
                       on_case=lambda case, what: (bar.advance(task), console.print(f"{case}: {what}")))
    for note in done["notes"]:
        console.print(f"[yellow]note:[/yellow] {note}")
    console.print(f"{done['written']} videos written, {done['skipped']} already there, {done['cases']} cases")
    console.print(f"output: {out}")


if __name__ == "__main__":
    app()
