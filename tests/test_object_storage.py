"""Inputs and output in object storage: a real S3-compatible server (moto) on 127.0.0.1,
reached only through the standard AWS_ENDPOINT_URL variable."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import runtime_stages
from lafid.recipe import Recipe
from lafid.shards import find_shards, read_clips, shard_files
from lafid.runner import curate
from lafid.video import content_id

SPLIT = {"stage": "shot_split", "cpus": 0.25, "params": {"min_clip_s": 0.5}}
LAUNCH = """
import json, sys
sys.path.insert(0, {tests!r})
import runtime_stages
runtime_stages.register()
from lafid.recipe import Recipe
from lafid.runner import curate
curate(Recipe(**json.loads(sys.argv[1])), [sys.argv[2]], sys.argv[3], executor="sequential")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1; the environment points the AWS variables at it."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            fs.create_dir("lafid")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    yield fs
    server.kill()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def stages_and_staging(tmp_path, monkeypatch):
    runtime_stages.register()
    monkeypatch.setenv("LAFID_STAGING", str(tmp_path / "staging"))
    monkeypatch.setenv("LAFID_INPUT_CACHE", str(tmp_path / "cache"))
    yield
    runtime_stages.unregister()


def upload(fs, paths, prefix):
    for path in paths:
        with open(path, "rb") as src, fs.open_output_stream(f"{prefix}/{Path(path).name}") as dst:
            dst.write(src.read())


def store_rows(fs, prefix, local):
    """Download an output prefix and read it as a local folder would be read."""
    local.mkdir()
    for info in fs.get_file_info(pafs.FileSelector(prefix)):
        with fs.open_input_stream(info.path) as src:
            (local / Path(info.path).name).write_bytes(src.read())
    table = read_clips(local)
    return sorted(json.dumps(r, sort_keys=True) for r in table.to_pylist()), local


def recorded(fs, prefix):
    try:
        with fs.open_input_stream(f"{prefix}/_manifest.jsonl") as fh:
            return [v for line in fh.read().decode().splitlines() for v in json.loads(line)["videos"]]
    except (OSError, FileNotFoundError):
        return []


@pytest.mark.timeout(300)
def test_s3_round_trip_with_resume_after_the_driver_is_killed(s3, stages_and_staging, make_video, carphone,
                                                                 tmp_path):
    from lafid import media

    mirrored = media.mirror(carphone)
    videos = [make_video("f_carphone", lambda: carphone, 29.97), make_video("f_mirrored", lambda: mirrored, 29.97),
              make_video("f_late20", lambda: carphone[20:], 29.97), make_video("f_late40", lambda: carphone[40:], 29.97),
              make_video("f_mirrored30", lambda: mirrored[30:], 29.97)]
    upload(s3, videos, "lafid/videos")
    recipe = Recipe(name="carry", output={"rows_per_shard": 1}, stages=[
        SPLIT, {"stage": "carry", "params": {"megabytes": 0.1}}, {"stage": "weigh", "params": {"delay_s": 1.0}}])

    curate(recipe, ["s3://lafid/videos/"], "s3://lafid/clean", executor="sequential")  # the truth
    clean, _ = store_rows(s3, "lafid/clean", tmp_path / "clean")
    assert len(clean) == 5
    rows = [json.loads(r) for r in clean]
    assert {r["source"] for r in rows} == {f"s3://lafid/videos/{Path(v).name}" for v in videos}
    assert {r["video_id"] for r in rows} == {content_id(v) for v in videos}  # same ids as on a local disk

    run = subprocess.Popen([sys.executable, "-c", LAUNCH.format(tests=str(Path(__file__).parent)),
                            json.dumps(recipe.model_dump(mode="json")), "s3://lafid/videos/", "s3://lafid/out"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 200
    while not recorded(s3, "lafid/out") and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.kill()  # the driver dies mid-run
    run.wait()
    before = recorded(s3, "lafid/out")
    assert 1 <= len(before) < 5, run.stderr.read()[-2000:]
    with s3.open_output_stream("lafid/out/clips-0000orphan.parquet") as fh:  # as if killed after a shard upload
        fh.write(b"not recorded")

    os.environ["LAFID_STAGING"] = str(tmp_path / "other-staging")  # resume from the store, not the local stage
    stats = curate(recipe, ["s3://lafid/videos/"], "s3://lafid/out", executor="sequential")
    assert stats.videos_skipped == len(before) and stats.videos_done == 5 - len(before)
    out, local = store_rows(s3, "lafid/out", tmp_path / "out")
    assert out == clean
    assert not (local / "clips-0000orphan.parquet").exists()  # the unrecorded shard was removed
    # the one reader of an output reads the store itself, as CoFE training's `find_shards` does
    assert sorted(json.dumps(r, sort_keys=True) for r in read_clips("s3://lafid/out").to_pylist()) == clean
    fs, files = find_shards(["s3://lafid/out"])
    assert files == shard_files("s3://lafid/out") and len(files) == 5 and fs.type_name == "s3"
    assert all(f.startswith("lafid/out/clips-") for f in files)
    done = recorded(s3, "lafid/out")
    assert len(done) == len(set(done)) == 5
    assert "_curate.log" in {Path(i.path).name for i in s3.get_file_info(pafs.FileSelector("lafid/out"))}
    # the run record reached the store: the resumed run's (the killed driver wrote none)
    with s3.open_input_stream("lafid/out/_runs.jsonl") as fh:
        runs = [json.loads(line) for line in fh.read().decode().splitlines()]
    assert [(r["outcome"], r["videos_skipped"], r["videos_done"]) for r in runs] == \
        [("done", len(before), 5 - len(before))]


def test_aws_endpoint_url_is_what_reaches_the_server(s3, monkeypatch):
    """The store is found only through AWS_ENDPOINT_URL: without it the same URL is not this server."""
    from lafid.storage import url_filesystem

    fs, path = url_filesystem("s3://lafid/videos")
    assert path == "lafid/videos" and fs.get_file_info("lafid").type == pafs.FileType.Directory
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    fs, _ = url_filesystem("s3://lafid/videos")
    with pytest.raises(OSError):
        fs.get_file_info("lafid/videos/x.mp4")
