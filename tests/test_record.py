"""The typed clip record: stages declare what they read and write; recipes are checked in order at load."""

import pytest

from lafid.recipe import RecipeError, check_order, load_recipe
from lafid.registry import STAGES, stage_class
from lafid.schema import CLIP_COLUMNS
from lafid.stage import Stage
from lafid.stages.face_constraints import FaceConstraints
from lafid.stages.shot_split import ShotSplit

HEAD = """name: t
stages:
"""


def recipe(tmp_path, *stages):
    path = tmp_path / "r.yaml"
    path.write_text(HEAD + "".join(f"  - stage: {s}\n" for s in stages))
    return path


def test_every_registered_stage_declares_schema_columns_only():
    for name in STAGES:
        cls = stage_class(name)
        assert set(cls.reads + cls.writes) <= CLIP_COLUMNS, name
    assert "work.frames" not in CLIP_COLUMNS and "frames" in FaceConstraints.writes_work


def test_bundled_recipes_pass_the_order_check():
    for name in ("demo", "lafid180k"):
        check_order([stage_class(s.stage) for s in load_recipe(name).stages])


def test_identity_before_face_constraints_fails_at_load_naming_stage_and_fields(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe(tmp_path, "shot_split", "identity_consistency", "face_constraints"))
    message = str(err.value)
    assert "'identity_consistency' reads work.frames" in message and "face_constraints" in message
    load_recipe(recipe(tmp_path, "shot_split", "face_constraints", "identity_consistency"))  # control: right order


def test_speech_before_face_constraints_fails_at_load_naming_the_columns(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe(tmp_path, "shot_split", "speech_disambiguation", "face_constraints"))
    message = str(err.value)
    assert "'speech_disambiguation' reads" in message and "face_constraints: list it earlier" in message
    assert all(c in message for c in ("frame_t", "frame_box", "frame_mouth_open")) and "fps" not in message
    load_recipe(recipe(tmp_path, "shot_split", "face_constraints", "speech_disambiguation"))  # control


def test_a_stage_reading_columns_no_earlier_stage_writes_names_them(tmp_path):
    class Reader(Stage):
        name = "reader"
        reads = ("frame_t", "frame_mouth_open", "fps")

    with pytest.raises(ValueError, match=r"'reader' reads frame_t, frame_mouth_open, which no earlier stage "
                                         r"writes \(written by face_constraints"):
        check_order([ShotSplit, Reader])
    check_order([ShotSplit, FaceConstraints, Reader])  # control: written before, accepted


def test_a_stage_listed_twice_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="'face_constraints' is listed twice"):
        load_recipe(recipe(tmp_path, "shot_split", "face_constraints", "face_constraints"))


def test_a_declaration_outside_the_schema_is_refused():
    class Typo(ShotSplit):
        name = "typo"
        writes = ("frame_boxes",)

    with pytest.raises(ValueError, match="not in lafid.schema: frame_boxes"):
        check_order([Typo])
