"""Commands on a curate output: `inspect`, `report`, `filter`, `export`, `identities`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from lafid.cli.common import _exit_on, console
from lafid.recipe import RecipeError, load_recipe

app = typer.Typer()


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
    from lafid.report.html import report as make

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
