"""Shared fixtures: real test footage built once per session, one local Ray cluster."""

from __future__ import annotations

import json
import os

import pytest

from lafid import media
from lafid.item import Item
from lafid.shards import read_clips
from lafid.stage import StageWorker
from lafid.video import content_id, probe

os.environ.setdefault("GLOG_minloglevel", "2")


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def carphone():
    return media.carphone_frames()


@pytest.fixture(scope="session")
def make_video(media_dir):
    """Write frames once per session under a name; later calls return the cached path."""

    def make(name: str, frames_fn, fps: float = 25.0, audio=None) -> str:
        path = media_dir / f"{name}.mp4"
        if not path.exists():
            media.write_video(str(path), frames_fn(), fps, audio=audio)
        return str(path)

    return make


@pytest.fixture(scope="session")
def distinct_videos(make_video, carphone):
    """Six short videos of distinct real content; `f_cut` has a hard cut (two clips)."""
    mirrored = media.mirror(carphone)
    hopper = media.still(media.grace_hopper(), 3.0, fps=29.97, size=256)
    return [
        make_video("f_carphone", lambda: carphone, 29.97),
        make_video("f_mirrored", lambda: mirrored, 29.97),
        make_video("f_cut", lambda: media.resize(carphone, 256, 256) + hopper, 29.97),
        make_video("f_late20", lambda: carphone[20:], 29.97),
        make_video("f_late40", lambda: carphone[40:], 29.97),
        make_video("f_mirrored30", lambda: mirrored[30:], 29.97),
    ]


def video_item(path: str) -> Item:
    return Item(source=path, video_id=content_id(path))


def clip_item(path: str) -> Item:
    """A whole video as one clip, for running clip stages without shot split."""
    info = probe(path)
    return Item(source=path, video_id=content_id(path), clip_index=0, clip_count=1,
                start_s=0.0, end_s=info.duration_s,
                columns={"fps": info.fps, "width": info.width, "height": info.height,
                         "has_audio": info.has_audio, "start_frame": 0, "end_frame": info.frame_count})


def shard_rows(out_dir, kind: str = "clips", drop: tuple[str, ...] = ()) -> list[str]:
    """An output's rows as sorted JSON text (NaN compares equal to NaN), minus `drop` columns."""
    table = read_clips(out_dir, kind=kind)
    if table is None:
        return []
    return sorted(json.dumps(r, sort_keys=True, default=bytes.hex) for r in table.drop_columns(list(drop)).to_pylist())


def manifest_videos(out_dir) -> list[str]:
    """Every video id the output's manifest records as done, in order."""
    from lafid.shards import MANIFEST

    path = os.path.join(out_dir, MANIFEST)
    return [v for line in open(path).read().splitlines() for v in json.loads(line)["videos"]]


def run_stage(stage, items):
    worker = StageWorker(stage)
    try:
        out, _ = worker.run(items)
    finally:
        worker.close()
    return out


@pytest.fixture(scope="session")
def ray_cluster():
    """One local 2-CPU Ray for the whole session (as on the smallest supported box)."""
    import ray

    from lafid.ray_executor import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield ray
    shutdown_ray()
