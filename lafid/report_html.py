"""`lafid report`: one self-contained HTML page (plots, face crops, run facts) per curate output.

`collect` computes every number from the shards (the same numbers go to `--json`),
`figures` draws them with matplotlib, `contact_sheet` cuts face crops from the
source videos along each clip's subject track (`frame_box` at `frame_t`), and
`render` puts it all in one HTML file whose images are embedded as base64 data
URIs: it opens from disk and loads nothing from the network (its content
security policy forbids it). Two outputs side by side (`lafid report A B`) share
every plot, one colour per run.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lafid.face.pose import BUCKET_PITCH, BUCKET_YAW, BUCKETS
from lafid.report import require_output
from lafid.runner import LOG
from lafid.shards import STATS, read_clips, read_manifest, shard_files
from lafid.sweep import sweeps

# Columns the report reads; older or newer shards may lack some, and the report shows what is there.
CLIP_COLUMNS = [
    "schema_version", "clip_id", "video_id", "source", "start_s", "end_s", "sample_fps", "frame_t", "frame_box",
    "frame_yaw", "frame_pitch", "yaw_range", "face_area_median", "blur_median", "pose_bucket", "id_backend",
    "id_metric", "id_threshold", "speech_ratio", "av_sync", "speaking_label", "caption_source", "language",
]
STAGE_ORDER = ("input", "shot_split", "face_constraints", "identity_consistency", "speech_disambiguation")
MANIFEST_KEYS = {"videos", "files", "clips", "rejects"}  # the rest is shown as recorded
YAW_EDGES = np.arange(-90, 91, 10)
PITCH_EDGES = np.arange(-90, 91, 10)
YAW_RANGE_EDGES = np.arange(0, 181, 10)
CROP_PX = 112
CROP_MARGIN = 1.4
# clip_quality columns (null when the stage did not run), as in the paper's Fig. 5 comparison.
QUALITY_PLOTS = (("motion", "motion per clip (optical flow)", "frame lengths per second"),
                 ("motion_camera", "camera motion per clip", "frame lengths per second"),
                 ("motion_subject", "subject motion per clip", "frame lengths per second"),
                 ("text_area", "burned-in text area per clip", "share of the frame"),
                 ("text_frames", "frames with text per clip", "share of sampled frames"),
                 ("aesthetic", "aesthetic score per clip", "score"))
QUALITY_KEYS = tuple(k for k, _, _ in QUALITY_PLOTS)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


@dataclass
class Run:
    """One curate output: its numbers (`stats`, JSON-ready) and the arrays the plots need."""

    out_dir: Path
    label: str
    stats: dict[str, Any]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    sync_by_label: dict[str, np.ndarray] = field(default_factory=dict)
    clips: pa.Table | None = None


def _summary(x: np.ndarray) -> dict[str, float] | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    if not len(x):
        return None
    q = np.percentile(x, [0, 25, 50, 75, 100])
    return {"n": int(len(x)), "min": float(q[0]), "p25": float(q[1]), "median": float(q[2]),
            "p75": float(q[3]), "max": float(q[4]), "mean": float(x.mean())}


def _hist(x: np.ndarray, edges: np.ndarray) -> dict[str, list]:
    x = np.asarray(x, dtype=np.float64)
    counts, _ = np.histogram(np.clip(x[np.isfinite(x)], edges[0], edges[-1]), bins=edges)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _column(table: pa.Table | None, name: str, dtype=np.float64) -> np.ndarray:
    if table is None or name not in table.column_names:
        return np.array([], dtype=dtype)
    return table[name].to_numpy(zero_copy_only=False).astype(dtype)


def _flat(table: pa.Table | None, name: str) -> np.ndarray:
    if table is None or name not in table.column_names:
        return np.array([], dtype=np.float64)
    return pc.list_flatten(table[name]).to_numpy(zero_copy_only=False).astype(np.float64)


def frame_buckets(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """EFHQ bucket of every (yaw, pitch), vectorised; same rule as `lafid.face.pose.pose_bucket`."""
    big_yaw, big_pitch = np.abs(yaw) > BUCKET_YAW, np.abs(pitch) > BUCKET_PITCH
    out = np.full(len(yaw), "extreme", dtype=object)
    out[~big_yaw & ~big_pitch] = "frontal"
    out[big_yaw & ~big_pitch & (yaw > 0)] = "right"
    out[big_yaw & ~big_pitch & (yaw <= 0)] = "left"
    out[big_pitch & ~big_yaw & (pitch > 0)] = "up"
    out[big_pitch & ~big_yaw & (pitch <= 0)] = "down"
    return out


def _counts(values) -> dict[str, int]:
    return dict(Counter("(none)" if v is None else str(v) for v in values).most_common())


def funnel(videos: int, clips_kept: int, rejects: pa.Table | None) -> dict[str, Any]:
    """Inputs -> clips -> kept: videos and clips lost at each stage, by reason, in pipeline order."""
    rows = rejects.select(["stage", "reason", "clip_index"]).to_pylist() if rejects is not None else []
    stages = list(STAGE_ORDER) + sorted({r["stage"] for r in rows} - set(STAGE_ORDER))
    whole = [r for r in rows if r["clip_index"] < 0]
    parts = [r for r in rows if r["clip_index"] >= 0]
    cut = clips_kept + len(parts)
    steps, clips_in = [], cut
    for stage in stages:
        v = Counter(r["reason"] for r in whole if r["stage"] == stage)
        c = Counter(r["reason"] for r in parts if r["stage"] == stage)
        if not v and not c and stage not in STAGE_ORDER[1:]:
            continue
        # shot_split both cuts clips and drops some of them: its clip rejects are counted in `cut`
        steps.append({"stage": stage, "videos_rejected": dict(v.most_common()),
                      "clips_in": clips_in if stage not in ("input",) else None,
                      "clips_rejected": dict(c.most_common()), "clips_out": clips_in - sum(c.values())})
        if stage != "input":
            clips_in -= sum(c.values())
    return {"input_videos": videos, "videos_rejected": len(whole), "videos_with_clips": videos - len(whole),
            "clips_cut": cut, "clips_kept": clips_kept, "stages": steps}


_RUN = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\S* \w+ lafid\.run: run: recipe (.+) "
                  r"\(fingerprint (\w+)\), executor (\w+)")
_DONE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\S* \w+ lafid\.run: done: (.*)$")


def run_log(out_dir: Path) -> list[dict[str, Any]]:
    """The runs `_curate.log` records: start time, recipe name and fingerprint, executor, wall time."""
    path = out_dir / LOG
    runs: list[dict[str, Any]] = []
    if not path.exists():
        return runs
    for line in path.read_text(errors="replace").splitlines():
        if m := _RUN.match(line):
            runs.append({"started": m[1], "recipe": m[2], "fingerprint": m[3], "executor": m[4],
                         "wall_s": None, "done": None})
        elif (m := _DONE.match(line)) and runs and runs[-1]["done"] is None:
            t0 = time.mktime(time.strptime(runs[-1]["started"], "%Y-%m-%d %H:%M:%S"))
            runs[-1]["wall_s"] = time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) - t0
            runs[-1]["done"] = m[2]
    return runs


def recipe_params(name: str, fingerprint: str) -> dict[str, Any] | None:
    """Every stage parameter of recipe `name`, if the recipe found under that name now still has the
    fingerprint the run recorded (so these are the parameters the run used); else None."""
    from lafid.recipe import RecipeError, load_recipe
    from lafid.registry import stage_class
    from lafid.runner import recipe_fingerprint

    try:
        recipe = load_recipe(name)
    except (RecipeError, OSError, ValueError):
        return None
    if recipe_fingerprint(recipe) != fingerprint:
        return None
    return {f"{spec.stage}.{key}": value for spec in recipe.stages
            for key, value in stage_class(spec.stage).Params(**spec.params).model_dump(mode="json").items()}


def run_facts(out_dir: Path, clips: pa.Table | None, manifest: list[dict]) -> dict[str, Any]:
    """What the output folder records about the run that made it; what it does not record is named."""
    from lafid import __version__

    facts: dict[str, Any] = {}
    fingerprints = sorted({e["recipe"] for e in manifest if e.get("recipe")})
    facts["recipe_fingerprint"] = fingerprints or None
    runs = run_log(out_dir)
    facts["recipe"] = sorted({r["recipe"] for r in runs}) or None
    facts["executor"] = sorted({r["executor"] for r in runs}) or None
    facts["runs"] = len(runs)
    walls = [r["wall_s"] for r in runs if r["wall_s"] is not None]
    facts["wall_s"] = sum(walls) if walls else None
    facts["first_run_started"] = runs[0]["started"] if runs else None
    params = None
    if len(fingerprints) == 1 and len(facts["recipe"] or []) == 1:
        params = recipe_params(facts["recipe"][0], fingerprints[0])
    facts["recipe_params_source"] = (
        f"recipe {facts['recipe'][0]!r} as found now, whose fingerprint matches the run's" if params
        else "not recorded (no recipe found now with the run's name and fingerprint)")
    extra = {k: v for e in manifest for k, v in e.items() if k not in MANIFEST_KEYS | {"recipe"}}
    if extra:
        facts["manifest_other"] = extra
    facts["flushes"] = len(manifest)
    stats_path = out_dir / STATS
    if stats_path.exists():
        facts["run_stats"] = json.loads(stats_path.read_text())
    shards = shard_files(out_dir, None)
    facts["parquet_written_by"] = sorted({pq.read_metadata(p).created_by for p in shards[:50]})
    facts["schema_versions"] = sorted({int(v) for v in _column(clips, "schema_version", np.int64)})
    for name in ("id_backend", "id_metric", "caption_source", "language"):
        if clips is not None and name in clips.column_names:
            facts[name] = _counts(clips[name].to_pylist())
    for name in ("id_threshold", "sample_fps"):
        vals = _column(clips, name)
        facts[name] = sorted({round(float(v), 4) for v in vals[np.isfinite(vals)]})
    facts["not_recorded"] = ["lafid and library versions of the run", "face detector / VAD / ASR models"] + \
        ([] if runs else ["recipe name, executor, wall time (no _curate.log)"]) + \
        ([] if fingerprints else ["recipe fingerprint"])
    facts["report_made_with"] = {"lafid": __version__, "python": platform.python_version(),
                                 "pyarrow": pa.__version__}
    return facts, params


def collect(out_dir: str | Path, label: str | None = None) -> Run:
    """Every number of the report for one curate output."""
    out_dir = Path(out_dir)
    require_output(out_dir)
    manifest = read_manifest(out_dir)
    files = shard_files(out_dir)
    names = set(pq.read_schema(files[0]).names) if files else set()
    clips = read_clips(out_dir, [c for c in (*CLIP_COLUMNS, *QUALITY_KEYS) if c in names]) if files else None
    rejects = read_clips(out_dir, kind="rejects")
    n = clips.num_rows if clips is not None else 0
    videos = len({v for e in manifest for v in e["videos"]})
    start, end = _column(clips, "start_s"), _column(clips, "end_s")
    duration = end - start
    yaw, pitch = _flat(clips, "frame_yaw"), _flat(clips, "frame_pitch")
    ok = np.isfinite(yaw) & np.isfinite(pitch)
    fb = Counter(frame_buckets(yaw[ok], pitch[ok]))
    per_video = Counter(clips["video_id"].to_pylist()) if clips is not None else Counter()
    done_ids = {v for e in manifest for v in e["videos"]}
    clip_counts = Counter(per_video.get(v, 0) for v in done_ids)
    labels = clips["speaking_label"].to_pylist() if clips is not None and "speaking_label" in names else []
    sync = _column(clips, "av_sync")
    sync_by = {lab: sync[[lbl == lab for lbl in labels]] for lab in sorted({str(x) for x in labels})} \
        if len(sync) else {}
    facts, params = run_facts(out_dir, clips, manifest)
    stats: dict[str, Any] = {
        "out_dir": str(out_dir),
        "label": label or "/".join(out_dir.resolve().parts[-2:]),
        "counts": {
            "input_videos": videos,
            "clips_kept": n,
            "clips_rejected": int((_column(rejects, "clip_index", np.int64) >= 0).sum()),
            "videos_rejected": int((_column(rejects, "clip_index", np.int64) < 0).sum()),
            "kept_hours": round(float(duration.sum()) / 3600, 6),
            "sampled_frames": int(len(yaw)),
            "face_frames": int(ok.sum()),
        },
        "pose": {
            "clips_by_bucket": {b: int(v) for b, v in zip(BUCKETS, [
                (clips["pose_bucket"].to_pylist().count(b) if clips is not None and "pose_bucket" in names else 0)
                for b in BUCKETS])},
            "frames_by_bucket": {b: int(fb.get(b, 0)) for b in BUCKETS},
            "yaw_hist": _hist(yaw, YAW_EDGES),
            "pitch_hist": _hist(pitch, PITCH_EDGES),
            "yaw_range_hist": _hist(_column(clips, "yaw_range"), YAW_RANGE_EDGES),
            "yaw": _summary(yaw), "pitch": _summary(pitch), "yaw_range": _summary(_column(clips, "yaw_range")),
        },
        "clips": {
            "duration_s": _summary(duration),
            "clips_per_video": {str(k): v for k, v in sorted(clip_counts.items())},
            "face_area_median": _summary(_column(clips, "face_area_median")),
            "blur_median": _summary(_column(clips, "blur_median")),
        },
        "identity": _identity(out_dir),
        "speech": {
            "labels": _counts(labels),
            "av_sync_by_label": {k: _summary(v) for k, v in sync_by.items()},
            "speech_ratio": _summary(_column(clips, "speech_ratio")),
        },
        "quality": {k: _summary(_column(clips, k)) for k in QUALITY_KEYS},
        "rejects": _counts(f"{s}/{r}" for s, r in zip(rejects["stage"].to_pylist(), rejects["reason"].to_pylist()))
        if rejects is not None else {},
        "funnel": funnel(videos, n, rejects),
        "sweeps": sweeps(out_dir),
        "run": facts,
        "recipe_params": params,
    }
    values = {"duration_s": duration, "yaw": yaw[ok], "pitch": pitch[ok],
              "yaw_range": _column(clips, "yaw_range"), "face_area_median": _column(clips, "face_area_median"),
              "blur_median": _column(clips, "blur_median"), "speech_ratio": _column(clips, "speech_ratio"),
              "clips_per_video": np.array([per_video.get(v, 0) for v in sorted(done_ids)], dtype=np.float64),
              **{k: _column(clips, k) for k in QUALITY_KEYS}}
    return Run(out_dir, stats["label"], stats, values, sync_by, clips)


def _identity(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "identities.parquet"
    if not path.exists():
        return None
    ids = pq.read_table(path, columns=["identity_id"])["identity_id"].to_pylist()
    sizes = Counter(Counter(ids).values())
    return {"clips": len(ids), "identities": len(set(ids)), "largest": max(Counter(ids).values(), default=0),
            "identities_by_size": {str(k): v for k, v in sorted(sizes.items())}}


# ---------------------------------------------------------------- contact sheet

def _pick_frames(clips: pa.Table, per_bucket: int) -> list[dict[str, Any]]:
    """Up to `per_bucket` clips per EFHQ bucket, each with its most typical frame in that bucket:
    the most frontal frame for `frontal`, the most extreme one for the others."""
    need = {"frame_yaw", "frame_pitch", "frame_box", "frame_t", "start_s", "source", "clip_id"}
    if clips is None or not need <= set(clips.column_names) or clips.num_rows == 0:
        return []
    yaw_list = clips["frame_yaw"].combine_chunks()
    yaw, pitch = _flat(clips, "frame_yaw"), _flat(clips, "frame_pitch")
    parent = pc.list_parent_indices(yaw_list).to_numpy(zero_copy_only=False)
    offsets = yaw_list.offsets.to_numpy()
    ok = np.isfinite(yaw) & np.isfinite(pitch)
    buckets = np.full(len(yaw), "", dtype=object)
    buckets[ok] = frame_buckets(yaw[ok], pitch[ok])
    size = np.abs(yaw) + np.abs(pitch)
    picks = []
    for bucket in BUCKETS:
        idx = np.flatnonzero(buckets == bucket)
        order = idx[np.argsort(size[idx] if bucket == "frontal" else -size[idx], kind="stable")]
        seen: set[int] = set()
        for i in order:
            row = int(parent[i])
            if row in seen:
                continue
            seen.add(row)
            picks.append({"bucket": bucket, "row": row, "frame": int(i - offsets[row]),
                          "yaw": float(yaw[i]), "pitch": float(pitch[i])})
            if len(seen) == per_bucket:
                break
    if not picks:  # no face measured (a recipe without face_constraints)
        return []
    rows = clips.select(["clip_id", "source", "start_s", "frame_t", "frame_box"]).take([p["row"] for p in picks])
    for pick, rec in zip(picks, rows.to_pylist()):
        pick.update(clip_id=rec["clip_id"], source=rec["source"], t=float(rec["frame_t"][pick["frame"]]),
                    start_s=float(rec["start_s"]), box=rec["frame_box"][pick["frame"]])
    return picks


def _grab(source: str, at_s: float) -> np.ndarray | None:
    """The frame at `at_s` seconds on the source's timeline, as displayed and as the face stage read it
    (`lafid.video.sample_frames`), or None when the source cannot be read now."""
    import av

    from lafid.video import sample_frames

    try:
        for _, frame in sample_frames(source, max(0.0, at_s - 0.002), at_s + 1.0, 1000.0):
            return frame
    except (OSError, av.error.FFmpegError, IndexError, ValueError):
        return None
    return None


def crop_face(frame: np.ndarray, box: list[float], px: int = CROP_PX) -> np.ndarray:
    """A square crop around a normalised x0,y0,x1,y1 box (CROP_MARGIN times its long side), px x px."""
    from PIL import Image

    h, w = frame.shape[:2]
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    side = max(x1 - x0, y1 - y0) * CROP_MARGIN
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    s = max(1, int(round(side)))
    pad = max(0, -left, -top, left + s - w, top + s - h)
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0))) if pad else frame
    crop = padded[top + pad: top + pad + s, left + pad: left + pad + s]
    return np.asarray(Image.fromarray(crop).resize((px, px), Image.BILINEAR))


def contact_sheet(run: Run, per_bucket: int = 6) -> list[dict[str, Any]]:
    """Face crops cut now from the source videos along each picked clip's subject track."""
    sheet = []
    for pick in _pick_frames(run.clips, per_bucket):
        box = pick.pop("box")
        frame = _grab(pick["source"], pick["start_s"] + pick["t"]) if box is not None else None
        pick.pop("row"), pick.pop("frame")
        pick["png"] = _png(crop_face(frame, box)) if frame is not None else None
        sheet.append(pick)
    return sheet


# ---------------------------------------------------------------- figures

def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure(width: float = 5.2, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _save(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _bars(runs: list[Run], title: str, keys: list[str], get, ylabel: str, horizontal: bool = False) -> bytes:
    fig, ax = _figure(5.2, max(1.8, 0.3 * len(keys) + 1.2) if horizontal else 3.0)
    width = 0.8 / len(runs)
    pos = np.arange(len(keys))
    for k, run in enumerate(runs):
        vals = [get(run, key) for key in keys]
        at = pos - 0.4 + width * (k + 0.5)
        bars = (ax.barh if horizontal else ax.bar)(at, vals, width, label=run.label, color=COLOURS[k % 4])
        ax.bar_label(bars, fontsize=7, padding=1)
    if horizontal:
        ax.set_yticks(pos, keys, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel)
    else:
        ax.set_xticks(pos, keys, fontsize=8, rotation=20 if max(map(len, keys), default=0) > 8 else 0)
        ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    return _save(fig)


def _hists(runs: list[Run], key: str, title: str, xlabel: str, edges: np.ndarray | None = None,
           log: bool = False) -> bytes:
    fig, ax = _figure()
    data = [run.values.get(key, np.array([])) for run in runs]
    data = [d[np.isfinite(d)] for d in data]
    if edges is None:
        both = np.concatenate(data) if data else np.array([])
        if log:
            both = both[both > 0]
        lo, hi = (both.min(), both.max()) if len(both) else ((1.0, 10.0) if log else (0.0, 1.0))
        edges = (np.geomspace(lo, hi if hi > lo else lo * 10, 25) if log
                 else np.linspace(lo, hi if hi > lo else lo + 1, 25))
    for k, (run, d) in enumerate(zip(runs, data)):
        ax.hist(np.clip(d, edges[0], edges[-1]), bins=edges, histtype="stepfilled" if len(runs) == 1 else "step",
                linewidth=1.5, alpha=0.8, color=COLOURS[k % 4], label=f"{run.label} (n={len(d)})")
    if log:
        ax.set_xscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    return _save(fig)


def _sync(runs: list[Run]) -> bytes:
    fig, ax = _figure()
    labels = sorted({lab for run in runs for lab in run.sync_by_label})
    width = 0.8 / len(runs)
    for k, run in enumerate(runs):
        for j, lab in enumerate(labels):
            v = run.sync_by_label.get(lab, np.array([]))
            v = v[np.isfinite(v)]
            x = j - 0.4 + width * (k + 0.5) + np.linspace(-width / 4, width / 4, len(v)) if len(v) else []
            ax.scatter(x, v, s=12, color=COLOURS[k % 4], label=run.label if j == 0 else None)
            if len(v):
                ax.hlines(np.median(v), j - 0.4 + width * k, j - 0.4 + width * (k + 1), color=COLOURS[k % 4])
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("av_sync (lip motion vs speech envelope)")
    ax.set_title("audio-visual sync per speaking label (line: median)", fontsize=10)
    if len(runs) > 1:
        ax.legend(fontsize=7)
    return _save(fig)


def _funnel_plot(runs: list[Run]) -> bytes:
    steps = ["input videos", "videos with clips", "clips cut"]
    stage_names = [s["stage"] for s in runs[0].stats["funnel"]["stages"] if s["clips_in"] is not None]
    for run in runs[1:]:
        stage_names += [s["stage"] for s in run.stats["funnel"]["stages"]
                        if s["clips_in"] is not None and s["stage"] not in stage_names]
    steps += [f"after {s}" for s in stage_names]

    def value(run: Run, step: str) -> int:
        f = run.stats["funnel"]
        if step == "input videos":
            return f["input_videos"]
        if step == "videos with clips":
            return f["videos_with_clips"]
        if step == "clips cut":
            return f["clips_cut"]
        by = {s["stage"]: s["clips_out"] for s in f["stages"]}
        return by.get(step[6:], f["clips_kept"])

    return _bars(runs, "reject funnel: inputs -> clips -> kept", steps, value, "videos / clips", horizontal=True)


def figures(runs: list[Run]) -> dict[str, bytes]:
    """Every plot as PNG bytes, keyed by a file-name-safe name."""
    def stat(*path):
        def get(run: Run, key: str) -> float:
            d = run.stats
            for p in path:
                d = d[p] or {}
            return d.get(key, 0)
        return get

    figs = {
        "funnel": _funnel_plot(runs),
        "rejects": _bars(runs, "rejects by stage/reason",
                         sorted({k for r in runs for k in r.stats["rejects"]}) or ["(none)"],
                         stat("rejects"), "rows", horizontal=True),
        "pose_clips": _bars(runs, "clips by dominant EFHQ pose bucket", list(BUCKETS),
                            stat("pose", "clips_by_bucket"), "clips"),
        "pose_frames": _bars(runs, "sampled face frames by EFHQ pose bucket", list(BUCKETS),
                             stat("pose", "frames_by_bucket"), "frames"),
        "yaw": _hists(runs, "yaw", "yaw over face frames", "yaw, degrees (+ = toward image right)", YAW_EDGES),
        "pitch": _hists(runs, "pitch", "pitch over face frames", "pitch, degrees (+ = up)", PITCH_EDGES),
        "yaw_range": _hists(runs, "yaw_range", "yaw range per clip", "yaw max - min, degrees", YAW_RANGE_EDGES),
        "duration": _hists(runs, "duration_s", "clip duration", "seconds"),
        "clips_per_video": _hists(runs, "clips_per_video", "kept clips per finished video", "clips",
                                  np.arange(-0.5, max([r.values["clips_per_video"].max(initial=0) for r in runs])
                                            + 1.5, 1.0)),
        "face_area": _hists(runs, "face_area_median", "face size (median box area / frame area)", "area ratio",
                            log=True),
        "blur": _hists(runs, "blur_median", "face sharpness (median Laplacian variance)", "variance", log=True),
        "speaking": _bars(runs, "clips by speaking label",
                          sorted({k for r in runs for k in r.stats["speech"]["labels"]}) or ["(none)"],
                          stat("speech", "labels"), "clips"),
        "av_sync": _sync(runs),
        "speech_ratio": _hists(runs, "speech_ratio", "speech ratio per clip", "share of the clip with speech",
                               np.linspace(0, 1, 21)),
    }
    for key, title, xlabel in QUALITY_PLOTS:
        if any(r.stats["quality"][key] for r in runs):
            figs[key] = _hists(runs, key, title, xlabel, log=key.startswith("motion"))
    figs.update(_sweep_plots(runs))
    if any(r.stats["identity"] for r in runs):
        sizes = sorted({int(k) for r in runs for k in (r.stats["identity"] or {}).get("identities_by_size", {})})
        figs["identities"] = _bars(runs, "identity clusters by size (clips per identity)",
                                   [str(s) for s in sizes],
                                   lambda run, k: (run.stats["identity"] or {}).get("identities_by_size", {})
                                   .get(k, 0), "identities")
    return figs


def _sweep_plots(runs: list[Run]) -> dict[str, bytes]:
    """One small plot per threshold: clips kept at each value, the recipe's value marked."""
    figs = {}
    keys = dict.fromkeys((s["stage"], s["param"]) for r in runs for s in r.stats["sweeps"])
    for stage, param in keys:
        fig, ax = _figure(3.4, 2.4)
        for k, run in enumerate(runs):
            for s in run.stats["sweeps"]:
                if (s["stage"], s["param"]) == (stage, param):
                    ax.plot(s["values"], s["kept"], "o-", color=COLOURS[k % 4], label=run.label, markersize=3)
                    ax.axvline(s["current"], color=COLOURS[k % 4], linestyle=":", linewidth=1)
        ax.set_title(f"{stage}.{param}", fontsize=9)
        ax.set_xlabel("threshold (dotted: the recipe's)", fontsize=8)
        ax.set_ylabel("clips kept", fontsize=8)
        ax.set_ylim(bottom=0)
        if len(runs) > 1:
            ax.legend(fontsize=6)
        figs[f"sweep-{stage}.{param}"] = _save(fig)
    return figs


# ---------------------------------------------------------------- HTML

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.figs{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.figs img{flex:0 0 auto;max-width:100%;height:auto;border:1px solid #eee}
.sheet{display:flex;flex-wrap:wrap;gap:6px}.sheet figure{margin:0;width:118px;font-size:10px;text-align:center}
.sheet img{width:112px;height:112px;border:1px solid #ccc}.missing{width:112px;height:112px;background:#eee;
display:flex;align-items:center;justify-content:center}code{font-size:12px}.note{color:#666}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _img(png: bytes, alt: str, name: str = "") -> str:
    return (f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{_e(alt)}"'
            f'{f" id={chr(34)}fig-{_e(name)}{chr(34)}" if name else ""}>')


def _fmt(v: Any) -> str:
    if v is None:
        return '<span class="note">-</span>'
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return f"<code>{_e(json.dumps(v, sort_keys=True))}</code>"
    return _e(v)


def _table(runs: list[Run], rows: list[tuple[str, list[Any]]], key: str = "") -> str:
    head = "".join(f"<th>{_e(r.label)}</th>" for r in runs)
    body = "".join(
        f'<tr><th>{_e(name)}</th>'
        + "".join(f'<td class="n" data-key="{_e(key + name)}">{_fmt(v)}</td>' for v in vals) + "</tr>"
        for name, vals in rows)
    return f"<table><tr><th></th>{head}</tr>{body}</table>"


def _pose_table(runs: list[Run]) -> str:
    """EFHQ buckets down, clips and sampled face frames of each run across."""
    head = "".join(f"<th>{_e(r.label)}: clips</th><th>{_e(r.label)}: frames</th>" for r in runs)
    body = "".join(
        f"<tr><th>{b}</th>" + "".join(
            f'<td class="n" data-key="pose.clips {b}">{r.stats["pose"]["clips_by_bucket"][b]}</td>'
            f'<td class="n" data-key="pose.frames {b}">{r.stats["pose"]["frames_by_bucket"][b]}</td>' for r in runs)
        + "</tr>" for b in BUCKETS)
    return f"<table><tr><th>EFHQ bucket</th>{head}</tr>{body}</table>"


def _summary_rows(runs: list[Run], section: str, names: list[str]) -> list[tuple[str, list[Any]]]:
    rows = []
    for name in names:
        vals = [(r.stats[section].get(name) or {}) for r in runs]
        rows.append((f"{name} median", [v.get("median") for v in vals]))
        rows.append((f"{name} min..max", [f"{v['min']:.4g} .. {v['max']:.4g}" if v else None for v in vals]))
    return rows


def _figs(figs: dict[str, bytes], names: list[str]) -> str:
    return '<div class="figs">' + "".join(_img(figs[n], n, n) for n in names if n in figs) + "</div>"


def _faces(runs: list[Run], sheets: list[list[dict[str, Any]]]) -> str:
    """The contact sheet: a few faces per EFHQ bucket, each linking its clip's row."""
    parts = ["<h2 id=faces>Faces by pose bucket</h2>",
             '<p class="note">Cut from the source videos when this report was made, along each clip\'s subject '
             "track (<code>frame_box</code> at <code>frame_t</code>); the most frontal frame for "
             "<i>frontal</i>, the most extreme for the other buckets.</p>"]
    for k, (run, sheet) in enumerate(zip(runs, sheets)):
        if len(runs) > 1:
            parts.append(f"<h3>{_e(run.label)}</h3>")
        for bucket in BUCKETS:
            faces = [s for s in sheet if s["bucket"] == bucket]
            if not faces:
                continue
            cells = []
            for s in faces:
                pic = (_img(s["png"], f"{bucket} face of clip {s['clip_id']}") if s["png"]
                       else '<div class="missing">source unavailable</div>')
                cells.append(f'<figure><a href="#clip-{k}-{_e(s["clip_id"])}">{pic}</a><figcaption>'
                             f'{_e(s["clip_id"])}<br>yaw {s["yaw"]:.0f} pitch {s["pitch"]:.0f}</figcaption></figure>')
            parts.append(f"<p><b>{_e(bucket)}</b></p><div class=sheet>{''.join(cells)}</div>")
        empty = [b for b in BUCKETS if not any(s["bucket"] == b for s in sheet)]
        if empty:
            parts.append(f'<p class="note">No face frames in: {", ".join(empty)}.</p>')
        shown = {s["clip_id"]: s for s in sheet}
        if shown:
            rows = "".join(f'<tr id="clip-{k}-{_e(c)}"><td><code>{_e(c)}</code></td><td>{_e(s["source"])}</td>'
                           f'<td class="n">{s["start_s"]:.2f}</td><td class="n">{s["t"]:.2f}</td></tr>'
                           for c, s in shown.items())
            parts.append("<table><tr><th>clip_id</th><th>source</th><th>clip start, s</th>"
                         f"<th>face at, s from clip start</th></tr>{rows}</table>")
    return "\n".join(parts)


def render(runs: list[Run], figs: dict[str, bytes], sheets: list[list[dict[str, Any]]]) -> str:
    """The whole page as one HTML string (no external references)."""
    title = "lafid report: " + " vs ".join(r.label for r in runs)
    counts = [(k, [r.stats["counts"][k] for r in runs]) for k in runs[0].stats["counts"]]
    nav = " · ".join(f'<a href="#{k}">{v}</a>' for k, v in (
        ("faces", "faces"), ("funnel", "funnel"), ("pose", "pose"), ("clips", "clips"), ("identity", "identity"),
        ("speech", "speech"), ("quality", "quality"), ("sweeps", "threshold sweeps"), ("run", "run facts")))
    parts = [f"<h1>{_e(title)}</h1>",
             "<p>" + "<br>".join(f"<b>{_e(r.label)}</b>: <code>{_e(r.out_dir)}</code>" for r in runs) + "</p>",
             f"<p>{nav}</p>",
             "<h2 id=counts>Counts</h2>",
             '<div class="figs">' + _table(runs, counts, "counts.") + _img(figs["funnel"], "funnel", "funnel")
             + "</div>",
             _faces(runs, sheets),
             "<h2 id=funnel>Reject funnel</h2>", '<div class="figs">', _img(figs["rejects"], "rejects", "rejects")]
    for k, run in enumerate(runs):
        f = run.stats["funnel"]
        rows = [("input videos", [f["input_videos"]]), ("videos rejected", [f["videos_rejected"]]),
                ("clips cut", [f["clips_cut"]])]
        for s in f["stages"]:
            lost = {**{f"video/{r}": n for r, n in s["videos_rejected"].items()},
                    **{f"clip/{r}": n for r, n in s["clips_rejected"].items()}}
            rows.append((f"{s['stage']}: in / rejected / out",
                         [f"{s['clips_in'] if s['clips_in'] is not None else '-'} / "
                          f"{sum(s['clips_rejected'].values())} / {s['clips_out']}"]))
            rows.append((f"{s['stage']}: reasons", [lost or None]))
        rows.append(("clips kept", [f["clips_kept"]]))
        parts.append(_table([run], rows, f"funnel.{k}."))
    parts += ["</div>", "<h2 id=pose>Head pose</h2>",
              _pose_table(runs),
              _figs(figs, ["pose_clips", "pose_frames", "yaw", "pitch", "yaw_range"]),
              "<h2 id=clips>Clips</h2>",
              _table(runs, _summary_rows(runs, "clips", ["duration_s", "face_area_median", "blur_median"]),
                     "clips."),
              _figs(figs, ["duration", "clips_per_video", "face_area", "blur"]),
              "<h2 id=identity>Identity</h2>"]
    if any(r.stats["identity"] for r in runs):
        parts.append(_table(runs, [(k, [(r.stats["identity"] or {}).get(k) for r in runs])
                                   for k in ("clips", "identities", "largest")], "identity."))
        parts.append(_figs(figs, ["identities"]))
    else:
        parts.append('<p class="note">No identities.parquet: run <code>lafid identities DIR</code> '
                     "to cluster clips by person.</p>")
    labels = sorted({k for r in runs for k in r.stats["speech"]["labels"]})
    parts += ["<h2 id=speech>Speech</h2>",
              _table(runs, [(lab, [r.stats["speech"]["labels"].get(lab, 0) for r in runs]) for lab in labels]
                     + _summary_rows(runs, "speech", ["speech_ratio"]), "speech."),
              _figs(figs, ["speaking", "av_sync", "speech_ratio"])]
    parts.append("<h2 id=quality>Quality</h2>")
    measured = [k for k in QUALITY_KEYS if any(r.stats["quality"][k] for r in runs)]
    parts.append(_table(runs, _summary_rows(runs, "quality", measured), "quality.") + _figs(figs, measured)
                 if measured else '<p class="note">No quality columns: add the <code>clip_quality</code> stage '
                 "to the recipe to measure motion, burned-in text and (with a model) aesthetics.</p>")
    parts.append("<h2 id=sweeps>Threshold sweeps</h2>"
                 '<p class="note">Clips each threshold would keep at other values, the others as recorded, '
                 "decided again from the stored measurements (what <code>lafid filter</code> gives).</p>")
    sweep_names = sorted(k for k in figs if k.startswith("sweep-"))
    parts.append(_figs(figs, sweep_names) if sweep_names else
                 '<p class="note">This output does not record its recipe\'s parameters: no sweeps.</p>')
    parts.append("<h2 id=run>Run facts</h2>"
                 '<p class="note">What the output folder records about the run that made it. Keys under '
                 "<i>not_recorded</i> are not written by the run.</p>")
    keys = list(dict.fromkeys(k for r in runs for k in r.stats["run"]))
    parts.append(_table(runs, [(k, [r.stats["run"].get(k) for r in runs]) for k in keys], "run."))
    if any(r.stats["recipe_params"] for r in runs):
        keys = list(dict.fromkeys(k for r in runs for k in (r.stats["recipe_params"] or {})))
        parts.append("<h3>Recipe parameters</h3>")
        parts.append(_table(runs, [(k, [(r.stats["recipe_params"] or {}).get(k) for r in runs]) for k in keys],
                            "param."))
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(parts)
            + "\n</body></html>\n")


def report(out_dirs: list[str | Path], html_path: str | Path | None = None, png_dir: str | Path | None = None,
           json_path: str | Path | None = None, per_bucket: int = 6) -> list[Run]:
    """Collect, plot and write the report of one output (or several, side by side)."""
    runs = [collect(d) for d in out_dirs]
    if len({r.label for r in runs}) < len(runs):
        for k, r in enumerate(runs):
            r.label = r.stats["label"] = f"{k + 1}: {r.out_dir}"
    figs = figures(runs)
    sheets = [contact_sheet(r, per_bucket) for r in runs]
    for run, sheet in zip(runs, sheets):
        run.stats["contact_sheet"] = [{k: v for k, v in s.items() if k != "png"} for s in sheet]
    if html_path is not None:
        Path(html_path).parent.mkdir(parents=True, exist_ok=True)
        Path(html_path).write_text(render(runs, figs, sheets))
    if png_dir is not None:
        png_dir = Path(png_dir)
        png_dir.mkdir(parents=True, exist_ok=True)
        for name, png in figs.items():
            (png_dir / f"{name}.png").write_bytes(png)
        for k, sheet in enumerate(sheets):
            for s in sheet:
                if s["png"]:
                    prefix = f"run{k + 1}-" if len(runs) > 1 else ""
                    (png_dir / f"{prefix}face-{s['bucket']}-{s['clip_id']}.png").write_bytes(s["png"])
    if json_path is not None:
        data = runs[0].stats if len(runs) == 1 else {"runs": [r.stats for r in runs]}
        Path(json_path).write_text(json.dumps(data, indent=1, sort_keys=True))
    return runs
