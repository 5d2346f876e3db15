"""`lafid filter` on a large output: wall time to re-decide N clips (goal: 10,000 in <= 10 s on 2 CPUs).

Writes N synthetic rows of the real schema (default 10,000 clips, 5 per video, one in five
rejected by face_constraints; every clip column filled: 40 sampled frames of face measurements,
a 512-d ArcFace reference and 4 representatives, a PNG face, words and a caption), recorded as
measured by the bundled `demo` recipe with looser face thresholds, then filters it with the demo
recipe itself. Baseline, in the same run: pyarrow reading and writing the same rows (the floor).
Then what `lafid report`'s threshold sweeps read of it: the columns their decisions read, beside
every column (what they read before).

    python benchmarks/filter_speed.py [--clips 10000]
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

from lafid.filter import all_rows, decision_columns, filter_output  # noqa: E402
from lafid.recipe import load_recipe  # noqa: E402
from lafid.shards import read_clips  # noqa: E402
from lafid.registry import stage_class  # noqa: E402
from lafid.runner import recipe_stages  # noqa: E402
from lafid.schema import CLIP_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION  # noqa: E402

FRAMES = 40
PER_VIDEO = 5


def loose_demo():
    """The demo recipe with every face threshold let through (what the stored output was measured with)."""
    demo = load_recipe("demo")
    stages = [s.model_copy(update={"params": {**s.params, "min_face_ratio": 0.0, "min_single_face_ratio": 0.0,
                                              "min_face_area": 0.0, "min_blur": 0.0}})
              if s.stage == "face_constraints" else s for s in demo.stages]
    return demo.model_copy(update={"stages": stages, "name": "demo-loose"})


def row(i: int, rng: np.random.Generator) -> dict:
    yaw = np.clip(np.cumsum(rng.normal(0, 8, FRAMES)), -89, 89).astype(np.float32)
    emb = rng.normal(size=(4, 512)).astype(np.float32)
    f = FRAMES
    return {
        "schema_version": SCHEMA_VERSION, "clip_id": f"c{i:015d}", "video_id": f"v{i // PER_VIDEO:08d}",
        "source": f"/data/raw/v{i // PER_VIDEO:08d}.mp4", "clip_index": i % PER_VIDEO, "start_s": 0.0, "end_s": 5.0,
        "start_frame": 0, "end_frame": 150, "fps": 30.0, "width": 1280, "height": 720, "has_audio": True,
        "sample_fps": 8.0, "frame_t": (np.arange(f) / 8).tolist(), "frame_face_count": [1] * f,
        "frame_box": [[0.3, 0.2, 0.6, 0.7]] * f, "frame_kps": [[0.4] * 10] * f, "frame_score": [0.9] * f,
        "frame_yaw": yaw.tolist(), "frame_yaw_beyond": [False] * f, "frame_pitch": [1.0] * f, "frame_roll": [2.0] * f,
        "frame_blur": [50.0] * f, "frame_area": [0.1] * f, "frame_mouth_open": [0.05] * f,
        "face_ratio": float(rng.uniform(0.6, 1)), "single_face_ratio": float(rng.uniform(0.6, 1)),
        "face_area_median": float(rng.uniform(0.005, 0.2)), "blur_median": float(rng.lognormal(3.5, 0.7)),
        "yaw_min": float(yaw.min()), "yaw_max": float(yaw.max()), "yaw_range": float(np.ptp(yaw)),
        "abs_yaw_max": float(np.abs(yaw).max()), "pitch_range": 3.0, "roll_range": 2.0, "large_pose_ratio": 0.1,
        "pose_bucket": "frontal", "pose_buckets": ["frontal", "left"],
        "id_backend": "arcface:w600k_mbf", "id_model_sha256": "0" * 64, "id_metric": "cosine", "id_threshold": 0.75,
        "id_ref_embedding": emb[0].tolist(), "id_ref_t": 1.0, "id_ref_box": [0.3, 0.2, 0.6, 0.7],
        "id_ref_face": bytes(rng.integers(0, 255, 6000, dtype=np.uint8)), "id_rep_embeddings": emb.tolist(),
        "id_rep_yaw": [0.0, 20.0, -20.0, 40.0], "id_rep_t": [1.0, 2.0, 3.0, 4.0], "id_frame_dist": [0.3] * f,
        "id_frame_box": [[0.3, 0.2, 0.6, 0.7]] * f, "id_dist_ref_max": 0.5, "id_dist_ref_median": 0.3,
        "id_dist_centroid_max": 0.4, "id_far_ratio": 0.0, "id_dist_frontal_median": 0.3,
        "id_dist_large_pose_median": 0.4, "id_track_breaks": 0, "id_other_frames": 0, "id_same_frames": f,
        "id_switch_t": None, "id_switch_dist": None, "id_track_dist_max": 0.5,
        "speech_segments": [[0.2, 4.5]], "speech_ratio": 0.86, "transcript": "hello there " * 5,
        "words": [{"word": "hello", "start": 0.2 + k / 5, "end": 0.4 + k / 5, "prob": 0.9} for k in range(10)],
        "language": "en", "asr_confidence": 0.9, "lip_activity": 0.3, "av_sync": 3.0, "av_lag_s": 0.0,
        "visual_speaking": None, "speaking_label": "speaking", "caption": "A person speaks to the camera.",
        "caption_source": "template",
    }


def synthetic(out: Path, n: int, stages: list) -> None:
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    manifest = []
    for s in range(0, n, 1000):
        rows = [row(i, rng) for i in range(s, min(n, s + 1000))]
        kept = [r for r in rows if int(r["clip_id"][1:]) % 5]
        rejects = [{**r, "stage": "face_constraints", "reason": "static_face", "detail": "synthetic"}
                   for r in rows if int(r["clip_id"][1:]) % 5 == 0]
        files = [f"clips-{s:08d}.parquet", f"rejects-{s:08d}.parquet"]
        pq.write_table(pa.Table.from_pylist(kept, schema=CLIP_SCHEMA), out / files[0])
        pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), out / files[1])
        manifest.append({"videos": sorted({r["video_id"] for r in rows}), "files": files, "clips": len(kept),
                         "rejects": len(rejects), "recipe": "synthetic", "stages": stages})
    (out / "_manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in manifest))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        synthetic(root / "in", args.clips, recipe_stages(loose_demo()))
        print(f"synthetic output: {args.clips} clips in {time.perf_counter() - t:.1f}s (not timed below)")
        t = time.perf_counter()
        for kind, schema in (("clips", CLIP_SCHEMA), ("rejects", REJECT_SCHEMA)):
            pq.write_table(read_clips(root / "in", kind=kind), root / f"copy-{kind}.parquet")
        floor = time.perf_counter() - t
        t = time.perf_counter()
        stats = filter_output(root / "in", load_recipe("demo"), root / "out")
        took = time.perf_counter() - t
        print(f"baseline: pyarrow reads and writes the {args.clips} rows: {floor:.2f}s")
        print(f"lafid filter: {took:.2f}s for {args.clips} clips ({args.clips / took:,.0f} clips/s; goal <= 10 s "
              f"for 10,000 on 2 CPUs); {stats.kept} kept, {stats.rejected} rejected, {stats.changed} changed")
        stages = [stage_class(name)(params) for name, params in recipe_stages(loose_demo())]
        for what, columns in (("every column (baseline)", None), ("the decisions' columns", decision_columns(stages))):
            t = time.perf_counter()
            table = all_rows(root / "in", columns)
            print(f"report sweeps' read, {what}: {time.perf_counter() - t:.2f}s, {table.num_columns} columns, "
                  f"{table.nbytes / 1e6:.0f} MB in memory")


if __name__ == "__main__":
    main()
