"""`lafid filter`: a loose run re-decided with a strict recipe equals a strict run, without decoding."""

import pytest
from typer.testing import CliRunner

from lafid import devset
from lafid.cli import app
from lafid.filter import FilterRefused, filter_output
from lafid.recipe import Recipe
from lafid.registry import STAGES, stage_class
from lafid.shards import read_clips
from lafid.runner import curate
from lafid.sweep import sweeps

from conftest import shard_rows

FAST = {"cpus": 0.5}
# loose: every threshold let through; strict: what a dataset would ask for
SPEECH = {"asr_backend": "none"}  # labels and template captions need no transcript
LOOSE = {"shot_split": {"min_clip_s": 0.5},
         "face_constraints": {"sample_fps": 4.0, "min_face_ratio": 0.0, "min_single_face_ratio": 0.0,
                              "min_face_area": 0.0, "min_blur": 0.0, "min_yaw_range": 0.0},
         "identity_consistency": {"max_far_ratio": 1.0, "max_track_breaks": 5},
         "speech_disambiguation": {**SPEECH, "min_sync_speech_s": 1.0}}
STRICT = {"shot_split": {"min_clip_s": 3.0},
          "face_constraints": {"sample_fps": 4.0, "min_face_ratio": 0.95, "min_single_face_ratio": 0.9,
                               "min_face_area": 0.05, "min_blur": 35.0, "min_yaw_range": 4.0},
          "identity_consistency": {"max_far_ratio": 0.1, "max_track_breaks": 0},
          "speech_disambiguation": {**SPEECH, "min_sync_speech_s": 5.0}}  # jwpIntro has ~3.5 s of speech


def _recipe(name: str, params: dict) -> Recipe:
    return Recipe(name=name, output={"rows_per_shard": 3},
                  stages=[{"stage": s, "params": p, **FAST} for s, p in params.items()])


@pytest.fixture(scope="module")
def outputs(distinct_videos, tmp_path_factory):
    """The session's silent test videos and a real talking clip (devset), curated loosely and strictly."""
    root = tmp_path_factory.mktemp("filter")
    inputs = distinct_videos + [str(devset.ensure() / "jwpIntro.mp4")]
    loose, strict = _recipe("loose", LOOSE), _recipe("strict", STRICT)
    curate(loose, inputs, root / "loose", executor="sequential")
    curate(strict, inputs, root / "strict", executor="sequential")
    return root, strict


def test_filtering_a_loose_run_strictly_equals_curating_strictly(outputs):
    root, strict = outputs
    stats = filter_output(root / "loose", strict, root / "filtered")
    kept = {r["clip_id"] for r in read_clips(root / "filtered").to_pylist()}
    direct = {r["clip_id"] for r in read_clips(root / "strict").to_pylist()}
    loose = {r["clip_id"] for r in read_clips(root / "loose").to_pylist()}
    print(f"loose kept {len(loose)}, strict kept {len(direct)}, filtered kept {len(kept)}; {stats}")
    assert kept == direct and loose != direct and stats.changed > 0  # control: the loose run keeps more
    labels = {r["clip_id"]: (r["speaking_label"], r["caption"]) for r in read_clips(root / "filtered").to_pylist()}
    was = {r["clip_id"]: (r["speaking_label"], r["caption"]) for r in read_clips(root / "loose").to_pylist()}
    print({k: (was[k], v) for k, v in labels.items() if was[k] != v})
    assert any(was[k] != v for k, v in labels.items())  # control: a label and its caption changed
    assert shard_rows(root / "filtered") == shard_rows(root / "strict")
    assert shard_rows(root / "filtered", "rejects") == shard_rows(root / "strict", "rejects")


def test_rejected_clips_keep_their_measurements(outputs):
    root, _ = outputs
    rejects = [r for r in read_clips(root / "strict", kind="rejects").to_pylist() if r["stage"] == "face_constraints"]
    assert rejects and all(r["face_ratio"] is not None and len(r["frame_t"]) > 0 for r in rejects)


def test_a_recipe_that_changes_what_is_measured_is_refused(outputs, tmp_path):
    root, _ = outputs
    faster = _recipe("faster", {**STRICT, "face_constraints": {**STRICT["face_constraints"], "sample_fps": 8.0}})
    with pytest.raises(FilterRefused, match=r"face_constraints\.sample_fps"):
        filter_output(root / "loose", faster, tmp_path / "out")
    assert not list(tmp_path.glob("out/*.parquet"))



def test_clips_a_stricter_run_never_measured_stay_rejected(outputs, tmp_path):
    """Filtering the strict run loosely: clips strict rejected before speech measured them stay rejected."""
    root, _ = outputs
    stats = filter_output(root / "strict", _recipe("loose", LOOSE), tmp_path / "back")
    before = {r["clip_id"]: (r["stage"], r["reason"]) for r in read_clips(root / "strict", kind="rejects").to_pylist()}
    after = {r["clip_id"]: (r["stage"], r["reason"]) for r in read_clips(tmp_path / "back", kind="rejects").to_pylist()}
    print(stats, after)
    assert after == before and stats.unmeasured == len(before) > 0
    kept = {r["clip_id"] for r in read_clips(tmp_path / "back").to_pylist()}
    assert kept == {r["clip_id"] for r in read_clips(root / "strict").to_pylist()}
    loose = {r["clip_id"] for r in read_clips(root / "loose").to_pylist()}
    assert kept < loose  # control: a fresh loose run keeps them


def test_the_command_names_the_parameter(outputs, tmp_path):
    root, _ = outputs
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstages:\n  - stage: shot_split\n    params: {min_clip_s: 2.0, max_clip_s: 5.0}\n"
                      "  - stage: face_constraints\n    params: {sample_fps: 4.0}\n"
                      "  - stage: identity_consistency\n"
                      "  - stage: speech_disambiguation\n    params: {asr_backend: none}\n")
    result = CliRunner().invoke(app, ["filter", str(root / "loose"), "--recipe", str(recipe), "--out",
                                      str(tmp_path / "out")])
    assert result.exit_code == 2 and "shot_split.max_clip_s" in result.output


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_parameter_is_a_threshold_or_a_measurement(name):
    cls = stage_class(name)
    assert cls.THRESHOLDS.isdisjoint(cls.MEASURE_PARAMS)
    assert cls.THRESHOLDS | cls.MEASURE_PARAMS == set(cls.Params.model_fields)


def test_a_threshold_sweep_keeps_what_filtering_keeps(outputs):
    """The report's sweep of min_blur over the loose run, against the stored sharpness of each clip."""
    root, _ = outputs
    sweep = next(s for s in sweeps(root / "loose") if s["param"] == "min_blur")
    blur = [r["blur_median"] for r in read_clips(root / "loose").to_pylist()]
    print(sweep)
    assert sweep["kept"] == [sum(b >= v for b in blur) for v in sweep["values"]]
    assert len(set(sweep["kept"])) > 1  # control: the sweep moves across the stored values


def test_reject_shards_without_measurements_read_beside_new_ones(outputs, tmp_path):
    """Reject rows written before they carried clip columns read with those columns null; such an
    output (no recipe parameters in its manifest) cannot be filtered, and says why."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lafid.schema import REJECT_SCHEMA

    root, strict = outputs
    old = tmp_path / "old"
    shutil.copytree(root / "strict", old)
    ledger = pa.schema([f for f in REJECT_SCHEMA if f.name in ("schema_version", "video_id", "clip_id", "source",
                        "clip_index", "start_s", "end_s", "stage", "reason", "detail")])
    rows = [{**r, "clip_id": "old-" + r["clip_id"], "schema_version": 1}
            for r in read_clips(root / "strict", kind="rejects").to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=ledger), old / "rejects-0000-v1.parquet")
    both = read_clips(old, kind="rejects").to_pylist()
    assert len(both) == 2 * len(rows)
    assert all(r["face_ratio"] is None for r in both if r["clip_id"].startswith("old-"))
    assert any(r["face_ratio"] is not None for r in both if not r["clip_id"].startswith("old-"))  # control
    manifest = old / "_manifest.jsonl"
    manifest.write_text("".join(line.split(', "stages"')[0] + "}\n" for line in manifest.read_text().splitlines()))
    with pytest.raises(FilterRefused, match="does not record its recipe"):
        filter_output(old, strict, tmp_path / "out")
