"""The `lafid` command as a user runs it: a subprocess, judged by what it prints and its exit code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from lafid.cli.cofe import _require_shards
from lafid.recipe import resolve
from lafid.schema import CLIP_SCHEMA

REPO = Path(__file__).resolve().parents[1]


def lafid(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("lafid")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lafid.cli"]
    # this checkout's code, also where the console script was installed from another one
    path = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": os.pathsep.join(path)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


# 1. A bundled name is a bundled recipe even where a folder of that name exists (`lafid demo --out
#    X/demo` run inside X); only an argument that looks like a path is read as a file.

def test_bundled_name_wins_over_a_folder_of_that_name(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "taken").write_text("a file where the output folder should go")
    run = lafid("curate", "clip.mp4", "--out", "taken", "--recipe", "demo", "--executor", "sequential",
                cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert lines(run.stderr, "recipe:") == [f"recipe: bundled demo ({resolve('demo')})"]
    assert "taken exists and is not a folder" in run.stderr  # got past the recipe, stopped at the output
    assert "Traceback" not in run.stderr and "IsADirectoryError" not in run.stderr

    # control: written as a path, the same name means the folder, and that is refused in one line
    run = lafid("curate", "clip.mp4", "--out", "taken", "--recipe", "./demo", cwd=tmp_path)
    assert run.returncode == 2
    assert lines(run.stderr, "error:") == ["error: recipe demo is a folder, not a file (bundled recipes are "
                                           "named without a suffix: " + ", ".join(_bundled()) + ")"]
    assert not lines(run.stderr, "recipe:")


def test_an_argument_that_looks_like_a_path_is_a_file(tmp_path):
    shutil.copy(REPO / "pipelines" / "demo.yaml", tmp_path / "mine.yaml")
    (tmp_path / "taken").write_text("")
    run = lafid("curate", "clip.mp4", "--out", "taken", "--recipe", "mine.yaml", cwd=tmp_path)
    assert lines(run.stderr, "recipe:") == ["recipe: mine.yaml"]

    # control: a bare name that is no bundled recipe is not looked up as a file
    (tmp_path / "mine").write_text((tmp_path / "mine.yaml").read_text())
    run = lafid("curate", "clip.mp4", "--out", "taken", "--recipe", "mine", cwd=tmp_path)
    assert run.returncode == 2
    assert lines(run.stderr, "error:") == ["error: recipe not found: no bundled recipe named 'mine' (bundled: "
                                           + ", ".join(_bundled()) + "; for a file give a path, e.g. ./mine.yaml)"]


def _bundled() -> list[str]:
    return sorted(p.stem for p in (REPO / "pipelines").glob("*.yaml"))


# 2. `lafid train` whose recipe names shards that are not there says what is missing and how to
#    make it, in one line, exit code 2, before any model is built.

def test_train_without_shards_says_what_is_missing_and_how_to_make_it(tmp_path):
    (tmp_path / "pipelines").mkdir()
    shutil.copy(REPO / "pipelines" / "cofe_tiny.yaml", tmp_path / "pipelines" / "cofe_tiny.yaml")
    run = lafid("train", "--recipe", "pipelines/cofe_tiny.yaml", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    shards = tmp_path / "out" / "demo" / "shards"
    assert run.stderr.splitlines() == [
        "recipe: pipelines/cofe_tiny.yaml",
        f"error: no clip shards for recipe pipelines/cofe_tiny.yaml: data.shards entry 'out/demo/shards' "
        f"({shards}) does not exist; make them with `lafid demo --out {shards.parent}` (sample footage) or "
        f"`lafid curate VIDEOS --out {shards}`, or point data.shards at a curate output",
    ]
    assert not (tmp_path / "out" / "cofe_tiny").exists()  # stopped before training wrote anything

    # an existing folder without shards is named as such
    shards.mkdir(parents=True)
    run = lafid("train", "--recipe", "pipelines/cofe_tiny.yaml", cwd=tmp_path)
    assert run.returncode == 2
    [error] = lines(run.stderr, "error:")
    assert f"({shards}) holds no clips-*.parquet; make them with `lafid demo" in error

    # control: the same folder once it holds a clip shard passes the check
    pq.write_table(CLIP_SCHEMA.empty_table(), shards / "clips-0000.parquet")
    _require_shards("cofe_tiny", [str(shards)])


# 3. `lafid demo` prints the run once: the run's table, then the output's summary, no table twice.
#    The demo's own input folder is filled beforehand with files the demo keeps (it only writes
#    missing sample videos) and that the first stage rejects at once, so the real command runs in
#    seconds.

SAMPLE_NAMES = ["astronaut_voice_over.mp4", "carphone.mp4", "carphone_mirrored.mp4", "cut_carphone_hopper.mp4",
                "no_face.mp4"]


def test_demo_prints_each_summary_once(tmp_path):
    inputs = tmp_path / "demo" / "input"
    inputs.mkdir(parents=True)
    for name in SAMPLE_NAMES:
        (inputs / name).write_text(f"not a video: {name}")
    run = lafid("demo", "--out", str(tmp_path / "demo"), "--executor", "sequential", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(inputs)) == SAMPLE_NAMES  # no sample video was made: the run stayed cheap
    shown = run.stdout + run.stderr
    videos = sum(name != "astronaut_voice_over.mp4" or shutil.which("espeak-ng") is not None
                 for name in SAMPLE_NAMES)
    assert shown.count("rejects by stage/reason") == 1
    assert len([line for line in shown.splitlines() if "shot_split/undecodable" in line]) == 1
    [row] = [line for line in shown.splitlines() if "shot_split/undecodable" in line]
    assert row.split()[-2:] == [str(videos), "│"]
    assert shown.count("items/s per worker") == 1  # the run's table
    assert shown.count("videos done") == 1  # the output's counts
    assert shown.count("clips by speaking") == 1

    # control: `curate` alone still prints the reject reasons of its run
    run = lafid("curate", str(inputs), "--out", str(tmp_path / "again"), "--recipe", "demo",
                "--executor", "sequential", cwd=tmp_path)
    shown = run.stdout + run.stderr
    assert run.returncode == 0, run.stderr
    assert shown.count("rejects by stage/reason") == 1 and "shot_split/undecodable" in shown


# 5. Help reads like other typer CLIs: flags carry no type, values an upper-case metavar.

def test_help_has_no_type_after_flags(tmp_path):
    run = lafid("train", "--help", cwd=tmp_path)
    assert run.returncode == 0
    [help_line] = [line for line in run.stdout.splitlines() if "--help" in line]
    [progress] = [line for line in run.stdout.splitlines() if "--no-progress" in line]
    [recipe] = [line for line in run.stdout.splitlines() if "--recipe" in line]
    assert "<" not in help_line + progress + recipe
    assert "TEXT" in recipe  # control: an option that takes a value still says what kind


# 6. `lafid --help` lists every command users have (old spellings kept) beside the new ones.

COMMANDS = {"curate", "demo", "recipes", "stages", "schema", "inspect", "export", "report", "filter", "identities",
            "train", "cache", "bench", "generate"}
BENCH_COMMANDS = {"build", "generate", "eval"}


def listed(help_text: str) -> set[str]:
    """Command names in the first column of a typer help's command table."""
    return set(re.findall(r"^│ ([a-z][\w-]*)  ", help_text, flags=re.M))


def test_help_lists_every_command_and_old_spellings_still_run(tmp_path):
    top = lafid("--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    assert COMMANDS <= listed(top.stdout), sorted(COMMANDS - listed(top.stdout))
    bench = lafid("bench", "--help", cwd=tmp_path)
    assert BENCH_COMMANDS <= listed(bench.stdout), bench.stdout
    assert "curate" not in listed(bench.stdout)  # control: the parser reads one table, not every word
    # `lafid generate` is `lafid bench generate`: the same options
    old, new = lafid("generate", "--help", cwd=tmp_path), lafid("bench", "generate", "--help", cwd=tmp_path)
    assert old.returncode == new.returncode == 0
    options = [set(re.findall(r"--[a-z][\w-]*", run.stdout)) for run in (old, new)]
    assert options[0] == options[1] and {"--checkpoint", "--face-guidance", "--no-ema"} <= options[0]
