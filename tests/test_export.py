"""`lafid export`: clips cut from real curate output decode, start on the right frame, last
their recorded span, pack into tars, and survive kill -9 exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lafid.export import curated_rows, export
from lafid.shards import read_manifest
from lafid.video import probe, sample_frames
from cofe_fixtures import pipeline_shards  # noqa: F401  (fixture)
from test_object_storage import s3  # noqa: F401  (fixture)


def first_frame(path: str, start_s: float = 0.0) -> np.ndarray:
    return next(sample_frames(path, start_s, start_s + 1.0, 1000.0))[1]


def export_rows(folder: Path) -> list[dict]:
    return [r for p in sorted(folder.glob("clips-*.parquet")) for r in pq.read_table(p).to_pylist()]


def audio_match(source: str, start_s: float, clip: str, span: float) -> tuple[float, float]:
    """Correlation of 10 ms loudness envelopes: the clip's audio against the source's over the
    clip's span, and (control) against the source's 100 ms later."""
    from lafid.speech.audio import extract_audio

    def env(path, start):
        v = extract_audio(path, start, start + span - 0.1).samples
        return np.abs(v[: len(v) // 160 * 160]).reshape(-1, 160).mean(1)

    mine = env(clip, 0.0)
    return tuple(float(np.corrcoef(mine, env(source, start_s + d))[0, 1]) for d in (0.0, 0.1))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def mp4_export(pipeline_shards, tmp_path_factory):  # noqa: F811
    to = tmp_path_factory.mktemp("export_mp4")
    stats = export(pipeline_shards, to, max_side=0)
    return to, stats


def test_every_clip_decodes_starts_on_its_frame_and_lasts_its_span(pipeline_shards, mp4_export):  # noqa: F811
    to, stats = mp4_export
    rows = curated_rows(pipeline_shards)
    exported = {r["clip_id"]: r for r in export_rows(to)}
    assert stats.clips == len(rows) == len(exported) >= 3 and stats.failed == 0
    assert any(r["start_s"] > 1.0 for r in rows)  # one clip starts mid-video: the seek is tested
    next_frame = []
    for row in rows:
        out = exported[row["clip_id"]]
        clip = str(to / out["clip_file"])
        info = probe(clip)
        span, frame = row["end_s"] - row["start_s"], 1.0 / row["fps"]
        got = psnr(first_frame(clip), first_frame(row["source"], row["start_s"]))
        # control: the source frame one frame later is measurably further from the clip's first frame
        later = psnr(first_frame(clip), first_frame(row["source"], row["start_s"] + 1.5 * frame))
        print(f"{row['clip_id']}: duration {info.duration_s:.3f}s vs span {span:.3f}s, first frame "
              f"PSNR {got:.1f} dB (next frame {later:.1f} dB), audio {info.has_audio}")
        next_frame.append(later)
        assert abs(info.duration_s - span) <= frame
        assert got >= 35.0
        assert info.has_audio == row["has_audio"]
        if row["has_audio"]:
            same, shifted = audio_match(row["source"], row["start_s"], clip, span)
            print(f"  audio envelope correlation {same:.4f} (shifted 100 ms: {shifted:.4f})")
            assert same >= 0.95 > shifted
        assert out["source"] == row["source"] and out["start_s"] == row["start_s"]
    assert min(next_frame) < 35.0  # on moving footage a clip one frame off would fail the bound


def test_webdataset_shards_read_back_with_tarfile(pipeline_shards, tmp_path):  # noqa: F811
    export(pipeline_shards, tmp_path, fmt="webdataset", max_side=128, samples_per_shard=2)
    tars = sorted(tmp_path.glob("clips-*.tar"))
    samples: dict[str, dict] = {}
    for path in tars:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.rsplit(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    rows = curated_rows(pipeline_shards)
    assert len(tars) >= 2 and sorted(samples) == sorted(r["clip_id"] for r in rows)
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        assert meta["clip_id"] == key and meta["clip_file"] == f"{key}.mp4"
        clip = tmp_path / "check.mp4"
        clip.write_bytes(sample["mp4"])
        assert max(first_frame(str(clip)).shape[:2]) <= 128
        assert abs(probe(str(clip)).duration_s - (meta["end_s"] - meta["start_s"])) <= 1.0 / meta["fps"]


KILLER = """
import os, sys
from lafid.export import export
cut = 0
def on_clip(item):
    global cut
    cut += 1
    if cut == int(sys.argv[3]):
        os.kill(os.getpid(), 9)
export(sys.argv[1], sys.argv[2], fmt=sys.argv[4], max_side=96, samples_per_shard=1, jobs=2, on_clip=on_clip)
"""


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".mp4", ".tar", ".parquet")}


@pytest.mark.parametrize("fmt", ["mp4", "webdataset"])
def test_kill_9_mid_export_then_rerun_gives_each_file_once(pipeline_shards, tmp_path, fmt):  # noqa: F811
    whole = tmp_path / "whole"
    export(pipeline_shards, whole, fmt=fmt, max_side=96, samples_per_shard=1)
    total = len(curated_rows(pipeline_shards))
    killed = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILLER, str(pipeline_shards), str(killed), str(total - 1), fmt])
    assert run.returncode == -9
    recorded = {f for e in read_manifest(killed) for f in e["files"]}
    left = files(killed)
    # control: the killed run left the export short, and with a clip file no manifest line names
    # (trusting the files on disk would lose clips and count an unfinished video)
    assert 0 < len(recorded) < len(files(whole))
    if fmt == "mp4":
        assert set(left) - recorded
    recut = []
    export(pipeline_shards, killed, fmt=fmt, max_side=96, samples_per_shard=1, jobs=2, on_clip=recut.append)
    assert files(killed) == files(whole)  # same names, same bytes, each once (2 clips cut at once or 1)
    assert 0 < len(recut) < total  # recorded videos were not cut again
    rows = export_rows(killed)
    assert sorted(r["clip_id"] for r in rows) == sorted(r["clip_id"] for r in curated_rows(pipeline_shards))


def test_training_and_cache_read_an_export_without_the_sources(pipeline_shards, mp4_export, tmp_path):  # noqa: F811
    from lafid.cofe.precompute import build_cache
    from lafid.cofe.data import ClipDataset
    from lafid.cofe.train import Trainer
    from cofe_fixtures import tiny_recipe

    to, stats = mp4_export
    # the exported clip gives the training sample the source gives (same draw; CRF 18 re-encode)
    curated, exported = (ClipDataset(tiny_recipe(d, tmp_path / "d").data) for d in (pipeline_shards, to))
    row = curated._row(0, 0)
    twin = next(r for r in (exported._row(f, i) for f in range(len(exported.files))
                            for i in exported.rows[f]) if r["clip_id"] == row["clip_id"])
    a, b = (ds.sample(r, np.random.default_rng(0))["frames"].float() for ds, r in ((curated, row), (exported, twin)))
    print(f"sample frames, source vs export: mean |diff| {(a - b).abs().mean():.2f} / 255")
    assert (a - b).abs().mean() < 3.0
    inputs = Path(curated_rows(pipeline_shards)[0]["source"]).parent
    away = inputs.with_name(inputs.name + ".away")
    inputs.rename(away)
    try:
        with pytest.raises(FileNotFoundError):  # control: the curate output needs its sources
            next(iter(ClipDataset(tiny_recipe(pipeline_shards, tmp_path / "curated").data)))
        recipe = tiny_recipe(to, tmp_path / "train", steps=2, save_every=1000)
        samples = list(ClipDataset(recipe.data))
        assert sorted({s["clip_id"] for s in samples}) == sorted(r["clip_id"] for r in curated_rows(pipeline_shards))
        result = Trainer(recipe).fit(progress=False)
        assert result.steps == 2
        cached = recipe.model_copy(update={"data": recipe.data.model_copy(update={"cache": tmp_path / "cache"})})
        assert build_cache(cached, shard_size=8).clips == stats.clips
        # exporting without the sources: every clip becomes a reject row that says why, no file is made
        orphan = export(pipeline_shards, tmp_path / "no_sources")
        reasons = [r for p in (tmp_path / "no_sources").glob("rejects-*.parquet")
                   for r in pq.read_table(p)["reason"].to_pylist()]
        assert orphan.clips == 0 and reasons == ["missing_source"] * stats.clips
        assert not list((tmp_path / "no_sources").glob("*.mp4"))
    finally:
        away.rename(inputs)


def test_cli_export_says_what_is_wrong_in_one_line(pipeline_shards, mp4_export, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from lafid.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["export", str(tmp_path / "nothing"), "--to", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "no curate output" in missing.output
    bad = runner.invoke(app, ["export", str(pipeline_shards), "--to", str(tmp_path / "y"), "--format", "avi"])
    assert bad.exit_code == 2 and "unknown format" in bad.output
    to, stats = mp4_export
    again = runner.invoke(app, ["export", str(pipeline_shards), "--to", str(to), "--max-side", "0"])
    assert again.exit_code == 0, again.output
    assert f"exported 0 clips of 0 videos (0 failed, {stats.videos} videos already done)" in again.output
    other = runner.invoke(app, ["export", str(pipeline_shards), "--to", str(to), "--max-side", "360"])
    assert other.exit_code == 2 and "written with another export setting" in other.output


def test_export_to_object_storage_gives_the_local_files(pipeline_shards, s3, tmp_path, monkeypatch):  # noqa: F811
    import pyarrow.fs as pafs

    monkeypatch.setenv("LAFID_STAGING", str(tmp_path / "staging"))
    local = tmp_path / "local"
    export(pipeline_shards, local, fmt="webdataset", max_side=96, samples_per_shard=2)
    stats = export(pipeline_shards, "s3://lafid/export", fmt="webdataset", max_side=96, samples_per_shard=2)
    stored = {Path(i.path).name: i for i in s3.get_file_info(pafs.FileSelector("lafid/export"))}
    assert stats.clips == len(curated_rows(pipeline_shards))
    assert {n for n in stored if n.startswith("clips-")} == {n for n in files(local)}
    for name in files(local):
        with s3.open_input_stream(f"lafid/export/{name}") as fh:
            assert fh.read() == (local / name).read_bytes()
    again = export(pipeline_shards, "s3://lafid/export", fmt="webdataset", max_side=96, samples_per_shard=2)
    assert (again.clips, again.skipped_videos) == (0, stats.videos)  # the store's manifest says all is done


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_face_crop_keeps_the_face_where_its_rewritten_box_says(pipeline_shards, tmp_path):  # noqa: F811
    from lafid.face.detect import ScrfdFaces
    from lafid.face.embed import EMBEDDED_SCRFD, embedded_model

    export(pipeline_shards, tmp_path, crop="face", max_side=0)
    scrfd = ScrfdFaces(embedded_model(EMBEDDED_SCRFD), det_size=640)
    source_rows = {r["clip_id"]: r for r in curated_rows(pipeline_shards)}
    for row in export_rows(tmp_path):
        k = next(i for i, b in enumerate(row["frame_box"]) if b and not np.isnan(b).any())
        frame = first_frame(str(tmp_path / row["clip_file"]), row["frame_t"][k])
        assert frame.shape[:2] == (row["height"], row["width"]) and row["width"] == row["height"]
        face = max(scrfd.detect(frame), key=lambda f: f.score)
        found = (face.box / np.array([row["width"], row["height"]] * 2)).tolist()
        moved, kept = iou(found, row["frame_box"][k]), iou(found, source_rows[row["clip_id"]]["frame_box"][k])
        print(f"{row['clip_id']}: crop {row['width']} px, face IoU {moved:.2f} (source box unchanged: {kept:.2f})")
        assert moved >= 0.5 and moved > kept + 0.1  # control: the box as measured on the source frame misses


def test_export_reads_only_the_shards_the_manifest_records(pipeline_shards, tmp_path):  # noqa: F811
    """A clip shard a crash left unrecorded is not curated output: export reads the recorded ones only.
    Control: the plain reader of the folder (every clips-*.parquet) does see the planted rows."""
    import shutil

    import pyarrow as pa

    from lafid.schema import CLIP_SCHEMA
    from lafid.shards import read_clips

    out = tmp_path / "out"
    shutil.copytree(pipeline_shards, out)
    rows = curated_rows(out)
    recorded = [r["clip_id"] for r in rows]
    planted = [dict(r, clip_id="planted-" + r["clip_id"]) for r in rows[:1]]
    pq.write_table(pa.Table.from_pylist(planted, schema=CLIP_SCHEMA), out / "clips-0000unrecorded.parquet")
    assert [r["clip_id"] for r in curated_rows(out)] == recorded
    assert read_clips(out).column("clip_id").to_pylist().count("planted-" + recorded[0]) == 1
