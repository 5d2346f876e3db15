"""File names a run must survive: not UTF-8, with a newline, 255 bytes long, a folder named
like a video. Every input ends as rows, and `source` gives back the exact bytes of its path."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lafid import media, schema
from lafid.recipe import Recipe
from lafid.shards import read_clips
from lafid.runner import curate

RECIPE = Recipe(name="names", stages=[{"stage": "shot_split", "params": {"min_clip_s": 0.5}}])


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory, carphone):
    """A folder of real clips under odd names; returns (folder, {path bytes: expected reason or None})."""
    root = os.fsencode(tmp_path_factory.mktemp("odd_names"))
    want: dict[bytes, str | None] = {}

    def video(name: bytes, frames) -> None:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        media.write_video(os.fsdecode(path), frames, 29.97)
        want[path] = None

    video(b"caf\xe9.mp4", carphone)  # Latin-1: not UTF-8
    video(b"new\nline.mp4", carphone[10:])
    video(b"L" * 251 + b".mp4", carphone[20:])  # the longest name a Linux file system allows
    video(b"d\xefr/inside.mp4", carphone[30:])  # a folder whose name is not UTF-8
    junk = os.path.join(root, b"\xff\xfe junk.mp4")
    with open(junk, "wb") as fh:
        fh.write(b"not a video\n" * 10)
    want[junk] = "undecodable"
    folder = os.path.join(root, b"clips.mp4")
    os.makedirs(folder)
    want[folder] = "not_a_file"
    pipe = os.path.join(root, b"pipe.mp4")  # a named pipe: opening it to read waits for a writer
    os.mkfifo(pipe)
    want[pipe] = "not_a_file"
    return os.fsdecode(root), want


def test_a_folder_named_like_a_video_and_given_by_name_gets_a_row(odd_folder, tmp_path):
    folder, _ = odd_folder
    named = os.path.join(folder, "clips.mp4")
    stats = curate(RECIPE, [named + "/"], tmp_path, executor="sequential")
    assert stats.videos_done == 1 and _by_path(tmp_path)[os.fsencode(named)][0]["reason"] == "not_a_file"


def _by_path(out) -> dict[bytes, list[dict]]:
    rows: dict[bytes, list[dict]] = {}
    for kind in ("clips", "rejects"):
        for row in (read_clips(out, kind=kind) or pa.table({})).to_pylist():
            rows.setdefault(os.fsencode(schema.source_path(row)), []).append(row)
    return rows


def test_every_odd_name_is_accounted_for_and_source_round_trips(odd_folder, tmp_path):
    folder, want = odd_folder
    stats = curate(RECIPE, [folder], tmp_path, executor="sequential")
    rows = _by_path(tmp_path)
    assert set(rows) == set(want) and stats.videos_done == len(want)  # every input, by its exact bytes
    for path, reason in want.items():
        assert [r.get("reason") for r in rows[path]] == [reason], (path, rows[path])
        assert os.path.exists(os.fsdecode(path))  # the stored path opens the file
    latin = os.path.join(os.fsencode(folder), b"caf\xe9.mp4")
    (row,) = rows[latin]
    assert row["source"].endswith("caf\ufffd.mp4") and row["source_bytes"] == latin
    newline = os.path.join(os.fsencode(folder), b"new\nline.mp4")
    assert rows[newline][0]["source"] == os.fsdecode(newline) and rows[newline][0]["source_bytes"] is None
    (junk,) = [r for p, rs in rows.items() for r in rs if r.get("reason") == "undecodable"]
    assert "junk.mp4" in junk["detail"]  # the detail quotes the path, as valid text


def test_control_without_lossless_source_one_name_sinks_the_run(odd_folder, tmp_path, monkeypatch):
    """The old way (the path's str straight into the string column) fails the whole run."""
    folder, _ = odd_folder
    monkeypatch.setattr(schema, "source_columns", lambda path: {"source": path, "source_bytes": None})
    with pytest.raises(UnicodeEncodeError):
        curate(RECIPE, [folder], tmp_path, executor="sequential")
    assert not list(tmp_path.glob("*.parquet"))


def test_shards_of_schema_version_1_read_beside_version_2(odd_folder, tmp_path):
    folder, _ = odd_folder
    curate(RECIPE, [os.path.join(folder, "new\nline.mp4")], tmp_path, executor="sequential")
    v2 = read_clips(tmp_path)
    old = v2.drop_columns(["source_bytes"]).to_pylist()
    for row in old:
        row.update(schema_version=1, clip_id="old-" + row["clip_id"])
    v1_schema = pa.schema([f for f in schema.CLIP_SCHEMA if f.name != "source_bytes"])
    pq.write_table(pa.Table.from_pylist(old, schema=v1_schema), tmp_path / "clips-0000-v1.parquet")
    both = read_clips(tmp_path).to_pylist()
    assert sorted(r["schema_version"] for r in both) == [1] * len(old) + [2] * v2.num_rows
    assert {schema.source_path(r) for r in both} == {os.path.join(folder, "new\nline.mp4")}
    # control: read without the current schema, the first (version 1) file's columns win
    import pyarrow.dataset as ds

    files = sorted(str(p) for p in tmp_path.glob("clips-*.parquet"))
    assert "source_bytes" not in ds.dataset(files, format="parquet").schema.names


def test_control_a_named_pipe_opened_to_read_blocks(odd_folder):
    """Why the pipe must never be opened (as the content hash did): the read waits for a writer."""
    import threading

    folder, _ = odd_folder
    pipe = os.path.join(folder, "pipe.mp4")
    reader = threading.Thread(target=lambda: open(pipe, "rb").close(), daemon=True)
    reader.start()
    reader.join(1.0)
    assert reader.is_alive()  # still waiting
    os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # a writer comes and goes: the reader is let go
    reader.join(5.0)
    assert not reader.is_alive()


def test_the_cli_accounts_for_every_odd_name_and_exits_0(odd_folder, tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    folder, want = odd_folder
    recipe = tmp_path / "split.yaml"
    recipe.write_text(json.dumps(RECIPE.model_dump(mode="json")))
    latin = os.path.join(os.fsencode(folder), b"caf\xe9.mp4")  # given by name too: listed once
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "lafid.cli", "curate", latin, os.fsencode(folder), "--out",
                          str(tmp_path / "out"), "--recipe", str(recipe), "--executor", "sequential",
                          "--no-progress"], capture_output=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"videos {len(want)}/{len(want)}".encode() in run.stderr
    assert set(_by_path(tmp_path / "out")) == set(want)
