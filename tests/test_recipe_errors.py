"""A recipe that cannot be used is one line on the terminal and exit code 2, whatever is wrong with it:
not UTF-8, too big, broken YAML, a tag that would build a Python object, values out of range."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from lafid.cli import app
from lafid.recipe import MAX_RECIPE_BYTES, Recipe, load_recipe

GOOD = "name: t\nstages:\n  - stage: shot_split\n    params: {min_clip_s: 0.5}\n"


def curate_with(tmp_path, text: bytes) -> tuple[int, list[str]]:
    path = tmp_path / "r.yaml"
    path.write_bytes(text)
    result = CliRunner().invoke(app, ["curate", str(tmp_path / "none.mp4"), "--out", str(tmp_path / "out"),
                                      "--recipe", str(path), "--executor", "sequential", "--no-progress"])
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


@pytest.mark.parametrize("text, says", [
    (GOOD.replace("name: t", "name: caf\xe9").encode("latin-1"), "not UTF-8 text (byte 0xe9 on line 1)"),
    (GOOD.encode() + b"#" * MAX_RECIPE_BYTES, "too big for a recipe"),
    (GOOD.replace("stages:", "stages: [").encode(), "not valid YAML at line 3, column 3: expected the node content"),
    (GOOD.replace("name: t", "name: !!python/object/apply:os.system [echo]").encode(),
     "not valid YAML at line 1, column 7: could not determine a constructor for the tag"),
])
def test_an_unusable_recipe_file_is_one_line_and_exit_2(tmp_path, text, says):
    code, lines = curate_with(tmp_path, text)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], lines
    assert not (tmp_path / "out").exists()
    code, lines = curate_with(tmp_path, GOOD.encode())  # control: the same recipe, well formed, gets past loading
    assert code == 0 and lines[0].startswith("recipe: "), lines


def test_every_failing_parameter_of_every_stage_is_named_once(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: t\nstages:\n"
                    "  - stage: shot_split\n    workers: 0\n    params: {min_clip_s: -1, max_clip_s: x}\n"
                    "  - stage: face_constraints\n    params: {sample_fps: -2, min_face_ratio: 5, bogus: 1}\n")
    with pytest.raises(ValueError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message
    for expected in ("stage 1 (shot_split) workers: Input should be greater than or equal to 1 (got 0)",
                     "stage 1 (shot_split) params: min_clip_s:", "max_clip_s: Input should be a valid number",
                     "stage 2 (face_constraints) params: sample_fps: Input should be greater than 0 (got -2)",
                     "min_face_ratio: Input should be less than or equal to 1 (got 5)",
                     "bogus: Extra inputs are not permitted"):
        assert message.count(expected) == 1, (expected, message)
    assert "literal" not in message and "WorkerRange" not in message  # no union dump
    # control: pydantic's own report of the same recipe is the union dump, stage 2 not named
    data = yaml.safe_load(path.read_text())
    with pytest.raises(ValidationError) as raw:
        Recipe.model_validate(data)
    assert "literal['auto']" in str(raw.value) and "(face_constraints)" not in str(raw.value)
