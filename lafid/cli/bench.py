"""LaFID-Bench commands: `bench build`, `bench generate`, `bench eval` (see docs/bench.md)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lafid.cli.common import _exit_on, _quiet_native_logs, console
from lafid.recipe import RecipeError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LaFID-Bench: build cases from shards, generate a video per case, score videos per face pose "
                       "(docs/bench.md).")


@app.command("build")
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


@app.command("generate")
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


@app.command("eval")
def bench_eval(
    bench: Path = typer.Argument(..., help="a bench folder (lafid bench build)"),
    videos: Optional[Path] = typer.Argument(None, help="folder of <case_id>.mp4 (lafid bench generate)"),
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
