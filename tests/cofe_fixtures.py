"""Shard builders for the CoFE tests: real clips, written by the curation pipeline or by hand.

`pose_shards` writes rows over real footage (carphone and its mirror) whose face
columns sweep the head through several EFHQ buckets, which the sample footage
itself (a man facing the camera) never does; `pipeline_shards` runs `lafid.runner`.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from lafid import media
from lafid.cofe.config import load_cofe_recipe
from lafid.face.pose import pose_bucket
from lafid.schema import CLIP_SCHEMA, to_table

FPS = 29.97
BOX = [0.3, 0.25, 0.7, 0.7]


def clip_row(source: str, video: str, index: int, start: float, yaws: list[float], reps: bool) -> dict:
    end = start + 1.5
    t = [i * 0.2 for i in range(len(yaws))]
    buckets = [pose_bucket(y, 0.0) for y in yaws]
    row = {
        "schema_version": 1, "clip_id": f"{video}-{index}", "video_id": video, "source": source,
        "clip_index": index, "start_s": start, "end_s": end, "fps": FPS, "width": 176, "height": 144,
        "frame_t": t, "frame_yaw": yaws, "frame_pitch": [0.0] * len(yaws), "frame_box": [BOX] * len(yaws),
        "pose_bucket": max(set(buckets), key=buckets.count), "pose_buckets": sorted(set(buckets)),
        "caption": f"a man talks on the phone, clip {index}",
    }
    if reps:  # pose-diverse representative ArcFace embeddings, as the identity stage writes them
        rng = np.random.default_rng(index)
        row.update(id_backend="arcface", id_rep_t=t[::2], id_rep_yaw=yaws[::2],
                   id_rep_embeddings=[rng.standard_normal(512).astype(np.float32).tolist() for _ in t[::2]])
    return row


@pytest.fixture(scope="session")
def pose_shards(tmp_path_factory):
    """3 shards, 12 clips over 2 real videos: sweeps through left/frontal/right, and frontal-only clips."""
    root = tmp_path_factory.mktemp("cofe_pose")
    frames = media.carphone_frames()
    sources = {"carphone": media.write_video(str(root / "carphone.mp4"), frames, FPS),
               "mirrored": media.write_video(str(root / "mirrored.mp4"), media.mirror(frames), FPS)}
    sweep = list(np.linspace(-70, 70, 7))
    rows = []
    for k in range(12):
        video = "carphone" if k % 2 == 0 else "mirrored"
        yaws = [0.0, 5.0, -3.0, 2.0, 0.0, 1.0, -2.0] if k % 4 == 3 else (sweep if k % 3 else sweep[::-1])
        rows.append(clip_row(sources[video], video, k, start=0.2 * (k // 2), yaws=[float(y) for y in yaws],
                             reps=k % 3 == 0))
    out = root / "shards"
    out.mkdir()
    for i in range(3):
        pq.write_table(to_table(rows[i * 4:(i + 1) * 4], CLIP_SCHEMA), out / f"clips-{i:04d}.parquet")
    return out, rows


@pytest.fixture(scope="session")
def pipeline_shards(tmp_path_factory):
    """Shards written by the real curation pipeline (demo recipe, in-process) from the sample footage."""
    from lafid.recipe import load_recipe
    from lafid.runner import curate

    root = tmp_path_factory.mktemp("cofe_curated")
    inputs = media.make_sample_set(str(root / "input"))
    curate(load_recipe("demo"), inputs, root / "shards", executor="sequential")
    return root / "shards"


def tiny_recipe(shards, output_dir, num_workers: int = 0, **train):
    """The bundled tiny recipe pointed at test shards, with test-sized training settings."""
    r = load_cofe_recipe("cofe_tiny")
    data = {"shards": [str(shards)], "num_workers": num_workers, "bucket_weights": {}}
    return r.model_copy(update={
        "data": r.data.model_copy(update=data),
        "train": r.train.model_copy(update={"output_dir": output_dir, **train}),
    })
