"""Whole pipeline: invariants, resume, Ray vs sequential, recipes and the CLI."""

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lafid import media
from lafid.cli import app
from lafid.recipe import RecipeError, load_recipe
from lafid.shards import read_clips
from lafid.runner import curate
from lafid.shards import MANIFEST
from lafid.video import content_id

from conftest import shard_rows as rows


@pytest.fixture(scope="module")
def inputs(media_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    paths = media.make_sample_set(str(folder))
    zero = folder / "zero.mp4"
    zero.write_bytes(b"")
    text = folder / "text.mp4"
    text.write_text("not a video")
    copy = folder / "carphone_copy.mp4"
    copy.write_bytes(open(paths[0], "rb").read())
    truncated = media.truncate(paths[0], str(folder / "truncated.mp4"), 0.5)
    audio_only = media.write_audio_only(str(folder / "audio_only.m4a"), media.speak("no picture here"))
    return paths + [str(zero), str(text), str(folder / "missing.mp4"), str(copy), truncated, audio_only]


@pytest.fixture(scope="module")
def recipe():
    r = load_recipe("demo")
    return r.model_copy(update={"output": r.output.model_copy(update={"rows_per_shard": 2})})


@pytest.fixture(scope="module")
def sequential_out(recipe, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    curate(recipe, inputs, out, executor="sequential")
    return out


def test_every_input_ends_as_clips_or_rejects_exactly_once(sequential_out, inputs):
    clips = read_clips(sequential_out).to_pylist()
    rejects = read_clips(sequential_out, kind="rejects").to_pylist()
    assert len({c["clip_id"] for c in clips}) == len(clips)
    ids = {content_id(p) for p in inputs}
    seen = {c["video_id"] for c in clips} | {r["video_id"].split("~")[0] for r in rejects}
    assert seen == ids
    assert {c["source"] for c in clips} | {r["source"] for r in rejects} == set(inputs)
    whole = [r for r in rejects if r["clip_index"] == -1]
    reasons = {r["source"].rsplit("/", 1)[-1]: r["reason"] for r in whole}
    assert reasons == {"carphone_copy.mp4": "duplicate_content", "zero.mp4": "empty_file", "text.mp4": "undecodable",
                       "missing.mp4": "missing_file", "audio_only.m4a": "no_video_stream",
                       "truncated.mp4": reasons.get("truncated.mp4")}
    # a file cut in half fails at open (index lost) or mid-stream, depending on where its index sits
    assert reasons["truncated.mp4"] in {"truncated", "undecodable", "decode_error"}
    assert any(r["reason"] == "no_face" for r in rejects)
    manifest = [json.loads(line) for line in (sequential_out / MANIFEST).read_text().splitlines()]
    done = [v for e in manifest for v in e["videos"]]
    assert len(done) == len(inputs) and {v.split("~")[0] for v in done} == ids
    # the hard cut splits carphone|hopper into two kept clips, one per identity
    cut = sorted((c for c in clips if c["source"].endswith("cut_carphone_hopper.mp4")), key=lambda c: c["start_frame"])
    assert len(cut) == 2 and abs(cut[1]["start_frame"] - 120) <= 1


def test_shards_carry_the_declared_schema(sequential_out):
    from lafid.schema import CLIP_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION

    for pattern, schema in (("clips-*.parquet", CLIP_SCHEMA), ("rejects-*.parquet", REJECT_SCHEMA)):
        paths = sorted(sequential_out.glob(pattern))
        assert paths, f"no {pattern} written"
        for path in paths:
            written = pq.read_schema(path)
            assert written.equals(schema), f"{path.name}: names, types or nullability differ from lafid.schema"
            assert [f.metadata for f in written] == [f.metadata for f in schema]  # column docs travel too
            assert written.metadata[b"lafid_schema_version"] == str(SCHEMA_VERSION).encode()
            table = pq.read_table(path)
            assert set(table["schema_version"].to_pylist()) == {SCHEMA_VERSION}


def test_resume_after_interruption_gives_the_same_rows(recipe, inputs, sequential_out, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_two(stats):
        if stats.videos_done >= 2:
            raise Stop

    with pytest.raises(Stop):
        curate(recipe, inputs, tmp_path, executor="sequential", on_update=stop_after_two)
    (tmp_path / "clips-orphan.parquet").write_bytes(b"left by a crash")
    (tmp_path / "identities.parquet").write_bytes(b"not a shard: must survive")
    stats = curate(recipe, inputs, tmp_path, executor="sequential")
    assert stats.videos_skipped >= 1
    # every input counted, those done before included (was "videos 2/2 (skipped as done: 2)" for 4 inputs)
    assert stats.videos_title() == f"videos {len(inputs)}/{len(inputs)} ({stats.videos_skipped} done before this run)"
    assert not (tmp_path / "clips-orphan.parquet").exists()
    assert (tmp_path / "identities.parquet").exists()
    assert rows(tmp_path) == rows(sequential_out)
    assert rows(tmp_path, "rejects") == rows(sequential_out, "rejects")
    again = curate(recipe, inputs, tmp_path, executor="sequential")
    assert again.videos_skipped == len(inputs) and again.kept == 0


@pytest.mark.ray
@pytest.mark.parametrize("pools", ["per_stage", "chain"])
def test_ray_runner_rows_equal_sequential_rows(ray_cluster, recipe, inputs, sequential_out, tmp_path, pools):
    stats = curate(recipe.model_copy(update={"pools": pools}), inputs, tmp_path, executor="ray")
    assert stats.videos_done == len(inputs)
    assert ("chain" in stats.ray.started) == (pools == "chain")
    assert rows(tmp_path) == rows(sequential_out)
    assert rows(tmp_path, "rejects") == rows(sequential_out, "rejects")


@pytest.mark.ray
def test_ray_runner_refuses_pools_that_cannot_fit(ray_cluster, inputs, tmp_path):
    greedy = load_recipe("demo")
    greedy.stages[1].workers = 8
    with pytest.raises(RecipeError, match="asks for .* CPUs"):
        curate(greedy, inputs[:1], tmp_path, executor="ray")


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\nstages: [{stage: shot_split, params: {min_clip_s: -1}}]", "min_clip_s"),
        ("name: x\nstages: [{stage: shot_split, params: {bogus: 1}}]", "bogus"),
        ("name: x\nstages: [{stage: no_such_stage}]", "unknown stage"),
        ("name: x\nstages: [{stage: shot_split}]\nextra_key: 1", "extra_key"),
        ("- just a list", "mapping"),
        ("name: [unclosed", "not valid YAML"),
        ("!!python/object/apply:os.system ['echo pwned']", "not valid YAML"),
    ],
)
def test_bad_recipes_fail_with_clear_messages(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_bundled_recipes_load():
    for name in ("demo", "lafid180k"):
        assert load_recipe(name).stages[0].stage == "shot_split"


def test_cli_curate_and_inspect(inputs, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["curate", *inputs[:2], "--out", str(tmp_path), "--recipe", "demo",
                                 "--executor", "sequential", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = runner.invoke(app, ["inspect", str(tmp_path)])
    assert report.exit_code == 0 and "frontal" in report.output and "no_audio" in report.output
    above = runner.invoke(app, ["inspect", str(tmp_path.parent)])  # the folder around the output: say so
    assert above.exit_code == 2 and "not a curate output folder" in above.output
    assert str(tmp_path) in above.output.replace("\n", "")  # and name the output inside it
    bad = runner.invoke(app, ["curate", inputs[0], "--out", str(tmp_path), "--recipe", "nope"])
    assert bad.exit_code == 2 and "recipe not found" in bad.output
