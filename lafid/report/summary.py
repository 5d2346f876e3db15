"""Summaries of a curate output: counts, reject reasons, pose histogram, speaking labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Group
from rich.table import Table

from lafid.face.pose import BUCKETS
from lafid.shards import MANIFEST, read_clips, read_manifest, shard_files


def count_table(title: str, column: str, counts: Counter) -> Table:
    """A two-column table of counts, most common first."""
    table = Table(title=title)
    table.add_column(column)
    table.add_column("count", justify="right")
    for key, n in counts.most_common():
        table.add_row(str(key), str(n))
    return table


def require_output(out_dir: str | Path) -> None:
    """Raise FileNotFoundError unless `out_dir` holds a curate output (a manifest or shards), naming the
    outputs just inside it: `lafid demo --out out/demo` writes its shards to out/demo/shards."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and (read_manifest(out_dir) or shard_files(out_dir, None)):
        return
    inside = sorted(str(p.parent) for p in out_dir.glob(f"*/{MANIFEST}")) if out_dir.is_dir() else []
    hint = f"; curate outputs inside it: {', '.join(inside)}" if inside else ""
    raise FileNotFoundError(f"not a curate output folder (no manifest, no shards): {out_dir}{hint}")


def summary(out_dir: str | Path) -> Group:
    out_dir = Path(out_dir)
    require_output(out_dir)
    clips, rejects = read_clips(out_dir), read_clips(out_dir, kind="rejects")
    videos = sum(len(e["videos"]) for e in read_manifest(out_dir))
    counts = Table(title=f"{out_dir}")
    counts.add_column("videos done")
    counts.add_column("clips kept")
    counts.add_column("rows rejected")
    counts.add_column("kept hours")
    hours = 0.0
    if clips is not None:
        hours = sum(e - s for s, e in zip(clips["start_s"].to_pylist(), clips["end_s"].to_pylist())) / 3600
    counts.add_row(str(videos), str(clips.num_rows if clips else 0), str(rejects.num_rows if rejects else 0),
                   f"{hours:.3f}")
    reasons = Counter()
    if rejects is not None:
        reasons.update(f"{stage}/{reason}" for stage, reason
                       in zip(rejects["stage"].to_pylist(), rejects["reason"].to_pylist()))
    poses = Table(title="clips by dominant pose bucket")
    poses.add_column("bucket")
    poses.add_column("clips", justify="right")
    poses.add_column("")
    if clips is not None:
        buckets = clips["pose_bucket"].to_pylist()
        top = max(1, max(buckets.count(b) for b in BUCKETS))
        for b in BUCKETS:
            n = buckets.count(b)
            poses.add_row(b, str(n), "#" * round(30 * n / top))
    labels = Counter()
    if clips is not None:
        labels.update(label or "(not analysed)" for label in clips["speaking_label"].to_pylist())
    return Group(counts, count_table("rejects by stage/reason", "stage/reason", reasons), poses,
                 count_table("clips by speaking label", "label", labels))
