"""Every number of `lafid report` for one curate output, JSON-ready (the same numbers go to `--json`).

The counts come from the shards and the manifest; the run facts (recipe, executor,
wall time, versions) from the run record the runner appends to `_runs.jsonl`
(`lafid.run_record.read_runs`). An output made before runs were recorded says so
("no run record") and reports everything else.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lafid.face.pose import BUCKETS, pose_bucket
from lafid.report.summary import require_output
from lafid.run_record import RUNS, read_runs
from lafid.shards import read_clips, read_manifest, shard_files
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
# clip_quality columns (null when the stage did not run), as in the paper's Fig. 5 comparison.
QUALITY_PLOTS = (("motion", "motion per clip (optical flow)", "frame lengths per second"),
                 ("motion_camera", "camera motion per clip", "frame lengths per second"),
                 ("motion_subject", "subject motion per clip", "frame lengths per second"),
                 ("text_area", "burned-in text area per clip", "share of the frame"),
                 ("text_frames", "frames with text per clip", "share of sampled frames"),
                 ("aesthetic", "aesthetic score per clip", "score"))
QUALITY_KEYS = tuple(k for k, _, _ in QUALITY_PLOTS)


@dataclass
class Run:
    """One curate output: its numbers (`stats`, JSON-ready) and the arrays the plots need."""

    out_dir: Path
    label: str
    stats: dict[str, Any]
    values: dict[str, np.ndarray] = field(default_factory=dict)
    sync_by_label: dict[str, np.ndarray] = field(default_factory=dict)
    clips: pa.Table | None = None
    frame_buckets: np.ndarray | None = None  # EFHQ bucket of every sampled frame of `clips`, "" without a face


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
    """`lafid.face.pose.pose_bucket` of every (yaw, pitch); "" where either is not finite (no face)."""
    ok = np.isfinite(yaw) & np.isfinite(pitch)
    out = np.full(len(yaw), "", dtype=object)
    out[ok] = [pose_bucket(y, p) for y, p in zip(yaw[ok].tolist(), pitch[ok].tolist())]
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


def recipe_params(manifest: list[dict]) -> dict[str, Any] | None:
    """Every stage parameter ("stage.param": value) the manifest records the output was measured with;
    None when it does not record them (written before they were recorded) or records several recipes."""
    recorded = {repr(e.get("stages")) for e in manifest}
    if len(recorded) != 1 or not manifest[0].get("stages"):
        return None
    return {f"{stage}.{key}": value for stage, params in manifest[0]["stages"] for key, value in params.items()}


def run_facts(out_dir: Path, clips: pa.Table | None, manifest: list[dict]) -> dict[str, Any]:
    """What the output folder records about the runs that made it (the run record, the manifest, the
    shards); what it does not record is named under `not_recorded`."""
    from lafid import __version__

    facts: dict[str, Any] = {}
    fingerprints = sorted({e["recipe"] for e in manifest if e.get("recipe")})
    facts["recipe_fingerprint"] = fingerprints or None
    runs = read_runs(out_dir)
    facts["run_record"] = RUNS if runs else f"no run record (no {RUNS}: made before runs were recorded)"
    facts["recipe"] = sorted({r["recipe"] for r in runs}) or None
    facts["executor"] = sorted({r["executor"] for r in runs}) or None
    facts["runs"] = len(runs)
    facts["outcomes"] = dict(Counter(r["outcome"] for r in runs)) or None
    walls = [r["wall_s"] for r in runs if r.get("wall_s") is not None]
    facts["wall_s"] = round(sum(walls), 3) if walls else None
    facts["first_run_started"] = runs[0]["started"] if runs else None
    distinct = {json.dumps(r["versions"], sort_keys=True): r["versions"] for r in runs if r.get("versions")}
    facts["versions"] = list(distinct.values()) or None
    facts["recipe_params_source"] = ("the stages and parameters recorded in the manifest" if recipe_params(manifest)
                                     else "not recorded (no manifest entry with the stages' parameters)")
    extra = {k: v for e in manifest for k, v in e.items() if k not in MANIFEST_KEYS | {"recipe", "stages"}}
    if extra:
        facts["manifest_other"] = extra
    facts["flushes"] = len(manifest)
    shards = shard_files(out_dir, None)
    facts["parquet_written_by"] = sorted({pq.read_metadata(p).created_by for p in shards[:50]})
    facts["schema_versions"] = sorted({int(v) for v in _column(clips, "schema_version", np.int64)})
    for name in ("id_backend", "id_metric", "caption_source", "language"):
        if clips is not None and name in clips.column_names:
            facts[name] = _counts(clips[name].to_pylist())
    for name in ("id_threshold", "sample_fps"):
        vals = _column(clips, name)
        facts[name] = sorted({round(float(v), 4) for v in vals[np.isfinite(vals)]})
    facts["not_recorded"] = ["face detector / VAD / ASR models"] + \
        ([] if runs else [f"recipe name, executor, wall time, versions (no run record: {RUNS})"]) + \
        ([] if fingerprints else ["recipe fingerprint"])
    facts["report_made_with"] = {"lafid": __version__, "python": platform.python_version(),
                                 "pyarrow": pa.__version__}
    return facts


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
    buckets = frame_buckets(yaw, pitch)
    fb = Counter(buckets[ok])
    per_video = Counter(clips["video_id"].to_pylist()) if clips is not None else Counter()
    done_ids = {v for e in manifest for v in e["videos"]}
    clip_counts = Counter(per_video.get(v, 0) for v in done_ids)
    labels = clips["speaking_label"].to_pylist() if clips is not None and "speaking_label" in names else []
    sync = _column(clips, "av_sync")
    sync_by = {lab: sync[[lbl == lab for lbl in labels]] for lab in sorted({str(x) for x in labels})} \
        if len(sync) else {}
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
        "run": run_facts(out_dir, clips, manifest),
        "recipe_params": recipe_params(manifest),
    }
    values = {"duration_s": duration, "yaw": yaw[ok], "pitch": pitch[ok],
              "yaw_range": _column(clips, "yaw_range"), "face_area_median": _column(clips, "face_area_median"),
              "blur_median": _column(clips, "blur_median"), "speech_ratio": _column(clips, "speech_ratio"),
              "clips_per_video": np.array([per_video.get(v, 0) for v in sorted(done_ids)], dtype=np.float64),
              **{k: _column(clips, k) for k in QUALITY_KEYS}}
    return Run(out_dir, stats["label"], stats, values, sync_by, clips, buckets)


def _identity(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / "identities.parquet"
    if not path.exists():
        return None
    ids = pq.read_table(path, columns=["identity_id"])["identity_id"].to_pylist()
    sizes = Counter(Counter(ids).values())
    return {"clips": len(ids), "identities": len(set(ids)), "largest": max(Counter(ids).values(), default=0),
            "identities_by_size": {str(k): v for k, v in sorted(sizes.items())}}

