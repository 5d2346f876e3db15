"""Curate output -> a dataset you can ship: one H.264 MP4 (with its audio) per kept clip.

Each clip is cut by FFmpeg on its recorded frame timestamps (`start_s` is a frame's
time on the source's timeline, as `ffmpeg -ss` measures), re-encoded, and named by
`clip_id`. The clip rows go with it as Parquet, with `clip_file` naming the MP4, so
a trainer needs no source videos (`lafid.cofe.data` reads either kind of folder).

`mp4` writes `<clip_id>.mp4` files beside the row shards; `webdataset` packs
`<clip_id>.mp4` + `<clip_id>.json` samples into `clips-<hash>.tar` shards that close
at a video boundary once they hold `samples_per_shard` samples.

Exactly-once and resumable as `curate`: the export folder is locked, every file is
written under a temporary name and renamed, and a video counts as exported only
once its manifest line (`lafid.shards.ShardWriter`) is written. A rerun deletes
clip files and shards no manifest line names, then does the remaining videos.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import subprocess
import tarfile
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from lafid.item import Item
from lafid.schema import CLIP_COLUMNS, ITEM_COLUMNS, source_path
from lafid.shards import MANIFEST, RecipeChanged, ShardWriter, _shard_name, read_clips, read_manifest
from lafid.storage import TMP_PREFIX, OutputError, is_url, local_path, open_output, remove_stale_temporaries

FORMATS = ("mp4", "webdataset")
CROPS = ("none", "face")
FACE_MARGIN = 0.35  # crop=face: margin around the union of the clip's face boxes, per side, of its size
BOX_COLUMNS = ("frame_box", "id_frame_box")  # per-frame box lists remapped into a face crop
# Seek this far before `start_s` so rounding to microseconds never loses the first frame.
_EPS = 1e-4


@dataclass
class ExportStats:
    videos: int = 0
    clips: int = 0
    failed: int = 0
    skipped_videos: int = 0


def curated_rows(out_dir: str | os.PathLike) -> list[dict]:
    """The kept clip rows of a curate output, from the shards its manifest records."""
    if not read_manifest(Path(out_dir)):
        raise FileNotFoundError(f"{out_dir} holds no curate output (no {Path(out_dir) / MANIFEST})")
    table = read_clips(out_dir, recorded=True)
    return [] if table is None else table.to_pylist()


def crop_box(row: dict) -> tuple[int, int, int, int] | None:
    """Square pixel crop (x, y, side, side) around every face box of the clip, or None when it has none."""
    boxes = [b for b in row.get("frame_box") or [] if b and not any(math.isnan(v) for v in b)]
    if not boxes:
        return None
    w, h = row["width"], row["height"]
    x0, y0 = min(b[0] for b in boxes) * w, min(b[1] for b in boxes) * h
    x1, y1 = max(b[2] for b in boxes) * w, max(b[3] for b in boxes) * h
    side = min(max(x1 - x0, y1 - y0) * (1 + 2 * FACE_MARGIN), w, h)
    side = int(side) // 2 * 2
    x = int(min(max((x0 + x1 - side) / 2, 0), w - side))
    y = int(min(max((y0 + y1 - side) / 2, 0), h - side))
    return x, y, side, side


def _remap(box: list[float] | None, crop: tuple[int, int, int, int], w: int, h: int) -> list[float] | None:
    """A normalised x0,y0,x1,y1 (or x,y,... landmark) list on the source -> normalised in the crop."""
    if box is None:
        return None
    cx, cy, cw, ch = crop
    return [(v * w - cx) / cw if i % 2 == 0 else (v * h - cy) / ch for i, v in enumerate(box)]


def cropped_row(row: dict, crop: tuple[int, int, int, int]) -> dict:
    """Row whose boxes and landmarks are measured in the cropped frame, as the MP4 shows it."""
    w, h = row["width"], row["height"]
    out = dict(row, width=crop[2], height=crop[3])
    for col in (*BOX_COLUMNS, "frame_kps"):
        if out.get(col) is not None:
            out[col] = [_remap(b, crop, w, h) for b in out[col]]
    if out.get("id_ref_box") is not None:
        out["id_ref_box"] = _remap(out["id_ref_box"], crop, w, h)
    return out


def _even(v: float) -> int:
    return max(2, int(round(v / 2)) * 2)


def video_filter(row: dict, max_side: int, crop: tuple[int, int, int, int] | None) -> str:
    """FFmpeg filter chain: optional crop, then a downscale so the longer side is at most `max_side`."""
    parts = []
    w, h = row["width"], row["height"]
    if crop:
        parts.append("crop={2}:{3}:{0}:{1}".format(*crop))
        w, h = crop[2], crop[3]
    if max_side and max(w, h) > max_side:
        s = max_side / max(w, h)
        w, h = _even(w * s), _even(h * s)
    parts.append(f"scale={_even(w)}:{_even(h)}:flags=bicubic")
    return ",".join(parts)


def cut_clip(source: str, start_s: float, end_s: float, vf: str, dest: Path) -> None:
    """Re-encode [start_s, end_s) of `source` (video timestamps kept, audio if any) to an MP4 at `dest`."""
    seek = max(start_s - _EPS, 0.0)
    cmd = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
           "-ss", f"{seek:.6f}", "-i", source, "-t", f"{end_s - seek - 2 * _EPS:.6f}",
           "-map", "0:v:0", "-map", "0:a:0?", "-fps_mode", "passthrough", "-vf", vf,
           "-c:v", "libx264", "-preset", "medium", "-crf", "18", "-pix_fmt", "yuv420p",
           "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", "-f", "mp4", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"ffmpeg exit {done.returncode}")


def _plain(v):
    """NaN -> null, at any depth (JSON has no NaN)."""
    if isinstance(v, list):
        return [_plain(x) for x in v]
    return None if isinstance(v, float) and math.isnan(v) else v


def _json_row(row: dict) -> bytes:
    """A row as JSON for a WebDataset sample (binary columns left out)."""
    keep = {k: _plain(v) for k, v in row.items() if not isinstance(v, bytes)}
    return json.dumps(keep, allow_nan=False, default=str).encode()


class _Exporter:
    """Cuts one video's clips and hands them to the shard writer."""

    def __init__(self, to: Path, fmt: str, max_side: int, crop: str):
        self.to, self.fmt, self.max_side, self.crop = to, fmt, max_side, crop
        self.pending: dict[str, bytes] = {}  # webdataset: MP4 bytes waiting for their tar

    def clip(self, row: dict) -> Item:
        source = source_path(row)
        item = Item(source=source, video_id=row["video_id"], clip_index=row["clip_index"],
                    start_s=row["start_s"], end_s=row["end_s"])
        box = crop_box(row) if self.crop == "face" else None
        if self.crop == "face" and box is None:
            return item.drop("export", "no_face_box", "crop=face needs the clip's face boxes")
        if not os.path.isfile(source):
            return item.drop("export", "missing_source", f"no such file: {row['source']}")
        out_row = cropped_row(row, box) if box else dict(row)
        cid = row["clip_id"]
        name = f"{cid}.mp4"
        tmp = self.to / f"{TMP_PREFIX}{name}"
        try:
            cut_clip(source, row["start_s"], row["end_s"], video_filter(row, self.max_side, box), tmp)
        except (RuntimeError, OSError) as exc:
            tmp.unlink(missing_ok=True)
            return item.drop("export", "cut_failed", str(exc))
        if self.fmt == "mp4":
            os.replace(tmp, self.to / name)
        else:
            self.pending[cid] = tmp.read_bytes()
            tmp.unlink()
        out_row["clip_file"] = name
        item.columns = {k: v for k, v in out_row.items() if k in CLIP_COLUMNS and k not in ITEM_COLUMNS}
        return item

    def files(self, kept: list[dict]) -> list[str]:
        """ShardWriter hook: the flush's clip files, recorded on its manifest line (mp4), or
        its samples packed into one tar named like its Parquet shard (webdataset)."""
        if self.fmt == "mp4":
            return [row["clip_file"] for row in kept]
        if not kept:
            return []
        name = _shard_name("clips", kept).replace(".parquet", ".tar")
        tmp = self.to / f"{TMP_PREFIX}{name}"
        with tarfile.open(tmp, "w") as tar:
            for row in kept:
                cid = row["clip_id"]
                for ext, data in (("mp4", self.pending.pop(cid)), ("json", _json_row(row))):
                    info = tarfile.TarInfo(f"{cid}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644
                    tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, self.to / name)
        return [name]


def export(out_dir: str | os.PathLike, to: str | os.PathLike, fmt: str = "mp4", max_side: int = 720,
           crop: str = "none", samples_per_shard: int = 100, jobs: int = 1,
           on_clip: Callable[[Item], None] | None = None) -> ExportStats:
    """Export the kept clips of the curate output `out_dir` into the folder `to` (or an object-storage
    URL, through a local staging folder as `curate` does); see the module docstring.

    The same folder takes only one setting of (format, max_side, crop): another raises
    `lafid.shards.RecipeChanged`. `jobs` clips are cut at once (FFmpeg processes); videos are still
    recorded in order. `on_clip` is called after each clip is cut."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if crop not in CROPS:
        raise ValueError(f"unknown crop {crop!r}: use one of {', '.join(CROPS)}")
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    if max_side < 0:
        raise ValueError("max_side must be >= 0 (0 keeps the source size)")
    if shutil.which("ffmpeg") is None:
        raise OutputError("lafid export needs the ffmpeg program on PATH")
    rows = curated_rows(out_dir)
    to = local_path(to)
    if not is_url(str(to)) and Path(to).resolve() == Path(out_dir).resolve():
        raise OutputError("export into a folder other than the curate output")
    by_video: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_video[row["video_id"]].append(row)
    with open_output(to) as (folder, remote):  # object storage: a local staging folder
        return _export_locked(folder, by_video, _Exporter(folder, fmt, max_side, crop), samples_per_shard,
                              f"export:{fmt}:{max_side}:{crop}", on_clip, remote.push if remote else None, jobs)


def _in_order(pool: ThreadPoolExecutor, fn: Callable[[dict], Item], rows: list[dict], window: int) -> Iterator[Item]:
    """`fn` over `rows` on the pool (each call waits on an ffmpeg process), results in order, at most
    `window` in flight."""
    pending: deque[Future] = deque()
    for row in rows:
        pending.append(pool.submit(fn, row))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _export_locked(to: Path, by_video: dict[str, list[dict]], exporter: _Exporter, samples_per_shard: int,
                   setting: str, on_clip: Callable[[Item], None] | None,
                   on_flush: Callable[[], None] | None, jobs: int) -> ExportStats:
    remove_stale_temporaries(to)
    try:
        writer = ShardWriter(to, samples_per_shard, recipe=setting)
    except RecipeChanged:
        written = {e.get("recipe") for e in read_manifest(to)} - {None}
        raise RecipeChanged(f"the export folder was written with another export setting "
                            f"({', '.join(sorted(written))}, now {setting}); export into another --to") from None
    writer.remove_unrecorded(("*.mp4", "clips-*.tar"))  # clip files and tars a crash left before their manifest line
    writer.extra_files = exporter.files
    writer.on_flush = on_flush  # object storage: each flush's files, then its manifest, go to the store
    todo = [v for v in sorted(by_video) if v not in writer.completed]
    stats = ExportStats(skipped_videos=len(by_video) - len(todo))
    rows = [row for v in todo for row in sorted(by_video[v], key=lambda r: r["clip_index"])]
    with ThreadPoolExecutor(jobs) as pool:
        for _, group in itertools.groupby(_in_order(pool, exporter.clip, rows, 2 * jobs), key=lambda i: i.video_id):
            items = list(group)
            for item in items:
                stats.clips += not item.rejected
                stats.failed += item.rejected
                if on_clip:
                    on_clip(item)
            writer.add_video(items)
            stats.videos += 1
    writer.close()
    return stats
