"""`lafid export` and the `clip_quality` stage on real footage: clip-seconds per wall-second.

Writes a curate output by hand (clip rows over the dev set's real videos, 3 s
clips), then times: decoding every frame of those ranges (the floor, baseline),
`export` with `--jobs 1` and `--jobs 2` at 720 px, and `clip_quality` per clip.

    python benchmarks/export_quality.py [--clips 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafid import devset  # noqa: E402
from lafid.export import export  # noqa: E402
from lafid.item import Item  # noqa: E402
from lafid.schema import CLIP_SCHEMA, SCHEMA_VERSION, clip_id  # noqa: E402
from lafid.video import content_id, probe, sample_frames  # noqa: E402
from lafid.stages.clip_quality import ClipQuality  # noqa: E402

SPAN = 3.0
VIDEOS = ("jwpIntro.mp4", "WolfgangLanger_Pexels.mp4", "single_face_pingpong.mp4")


def curate_output(out: Path, n: int) -> list[dict]:
    root = devset.ensure()
    rows = []
    for k in range(n):
        source = str(root / VIDEOS[k % len(VIDEOS)])
        info = probe(source)
        start = (k // len(VIDEOS)) * SPAN % max(info.duration_s - SPAN, 1e-3)
        vid = content_id(source)
        rows.append({"schema_version": SCHEMA_VERSION, "clip_id": clip_id(vid, start, start + SPAN), "video_id": vid,
                     "source": source, "clip_index": k, "start_s": start, "end_s": start + SPAN, "fps": info.fps,
                     "width": info.width, "height": info.height, "has_audio": info.has_audio})
    out.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=CLIP_SCHEMA), out / "clips-0.parquet")
    videos = sorted({r["video_id"] for r in rows})
    (out / "_manifest.jsonl").write_text(json.dumps({"videos": videos, "files": ["clips-0.parquet"]}) + "\n")
    return rows


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--keep", type=Path)
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="lafid-export-bench-"))
    rows = curate_output(work / "out", args.clips)
    seconds = SPAN * len(rows)
    floor = timed(lambda: [sum(1 for _ in sample_frames(r["source"], r["start_s"], r["end_s"], 1000.0))
                           for r in rows])
    print(f"{len(rows)} clips, {seconds:.0f} clip-seconds of real footage (dev set), clip-seconds per wall-second:")
    print(f"  decode every frame (baseline)       {seconds / floor:6.1f}")
    for jobs in (1, 2):
        wall = timed(lambda: export(work / "out", work / f"export-j{jobs}", jobs=jobs))
        print(f"  export, 720 px, --jobs {jobs}             {seconds / wall:6.1f}")
    stage = ClipQuality()
    stage.setup()
    wall = timed(lambda: [stage.process_item(Item(source=r["source"], video_id=r["video_id"], clip_index=0,
                                                  start_s=r["start_s"], end_s=r["end_s"])) for r in rows])
    print(f"  clip_quality stage (defaults)       {seconds / wall:6.1f}")


if __name__ == "__main__":
    main()
