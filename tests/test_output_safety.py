"""One run per output folder, checked before any work; the recipe that wrote a folder is
the one that adds to it; reruns with nothing to do do nothing."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fault_stages
from lafid import runner
from lafid.cli import app
from lafid.recipe import Recipe
from lafid.shards import read_clips
from lafid.runner import curate
from lafid.shards import MANIFEST
from lafid.storage import LOCK, OutputBusy, OutputLock

TESTS = Path(__file__).resolve().parent
SPLIT = {"stage": "shot_split", "cpus": 0.25, "params": {"min_clip_s": 0.5}}


def cli(*args):
    return CliRunner().invoke(app, ["curate", *map(str, args), "--executor", "sequential", "--no-progress"])


@pytest.fixture(scope="module")
def videos(make_video, carphone):
    return [make_video("s_carphone", lambda: carphone, 29.97), make_video("s_late", lambda: carphone[30:], 29.97)]


@pytest.fixture
def split_recipe(tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text(json.dumps({"name": "split", "stages": [SPLIT]}))
    return path


def test_a_second_run_into_a_busy_folder_stops_and_the_first_run_is_clean(videos, tmp_path):
    gate = tmp_path / "open"
    recipe = tmp_path / "gated.yaml"
    recipe.write_text(json.dumps({"name": "gated", "stages": [SPLIT, {"stage": "gate",
                                                                      "params": {"open_when": str(gate)}}]}))
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); import fault_stages; "
                               "fault_stages.register(); from lafid.cli import app; app()",
         "curate", *videos, "--out", str(out), "--recipe", str(recipe), "--executor", "sequential", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOCK).exists() and (out / LOCK).read_text().strip()):  # the first run holds the lock
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.1)
        fault_stages.register()
        try:
            second = cli(*videos, "--out", out, "--recipe", recipe)
        finally:
            fault_stages.unregister()
        assert second.exit_code == 2, second.output
        assert f"another lafid run (pid {first.pid}) is writing to {out}" in " ".join(second.output.split())
        assert not list(out.glob("*.parquet"))  # the second run wrote nothing
    finally:
        gate.touch()
        output, _ = first.communicate(timeout=180)
    assert first.returncode == 0, output
    fault_stages.register()
    try:
        curate(Recipe(**json.loads(recipe.read_text())), videos, tmp_path / "clean", executor="sequential")
    finally:
        fault_stages.unregister()
    assert read_clips(out).sort_by("clip_id").to_pylist() == read_clips(tmp_path / "clean").sort_by("clip_id").to_pylist()
    assert len((out / MANIFEST).read_text().splitlines()) == 1
    OutputLock(out).acquire().release()  # released when the first run ended


def test_a_busy_folder_is_refused_before_the_recipe_imports_its_stages(videos, tmp_path):
    """Loading a recipe imports every stage's libraries (seconds on a busy machine); a busy --out is
    refused before that. The child reports whether a stage module was imported when it exited."""
    probe = ("import sys\nfrom lafid.cli import app\ntry:\n    app()\nexcept SystemExit as end:\n"
             "    print(end.code, 'lafid.stages.face_constraints' in sys.modules)\n")

    def child(*args):
        env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
        return subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=120)

    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        refused = child("curate", videos[0], "--out", str(out), "--recipe", "demo", "--no-progress")
    assert refused.stdout.split() == ["2", "False"] and "another lafid run" in refused.stderr, refused
    # control: what the refusal skips, loading the recipe, imports the stage modules
    loaded = subprocess.run([sys.executable, "-c", "import sys; from lafid.recipe import load_recipe; "
                             "load_recipe('demo'); print('lafid.stages.face_constraints' in sys.modules)"],
                            capture_output=True, text=True, cwd=TESTS.parent)
    assert loaded.stdout.split() == ["True"], loaded


def test_lock_is_exclusive_and_released(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(OutputBusy, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path).acquire()
    with OutputLock(tmp_path):  # control: free again once released
        pass


def test_unusable_output_fails_at_once_with_one_line(videos, split_recipe, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in ((a_file, "is not a folder"), (a_file / "sub", "cannot create output folder"),
                         (Path("/proc/lafid-out"), "cannot create output folder")):
        result = cli(videos[0], "--out", out, "--recipe", split_recipe)
        text = " ".join(result.output.split())  # the console wraps long lines
        assert result.exit_code == 2 and message in text, result.output
        assert text.count("error:") == 1 and "Traceback" not in text and not (out / "_curate.log").exists()
    good = cli(videos[0], "--out", tmp_path / "good", "--recipe", split_recipe)  # control
    assert good.exit_code == 0, good.output


def unprivileged_cli(*args, cwd) -> subprocess.CompletedProcess:
    """`lafid curate ARGS` as a user whom file permissions bind: as root, with the capabilities that
    override them dropped (`setpriv`; root stays the owner of its files, which permissions then bind)."""
    cmd = [sys.executable, "-m", "lafid.cli", "curate", *map(str, args), "--executor", "sequential",
           "--no-progress"]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "COLUMNS": "200"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_read_only_output_fails_before_any_work(videos, split_recipe, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    result = unprivileged_cli(videos[0], "--out", out, "--recipe", split_recipe, cwd=tmp_path)
    assert result.returncode == 2 and "not writable" in result.stderr, result.stderr
    out.chmod(0o755)  # control: the same run into a writable folder
    assert unprivileged_cli(videos[0], "--out", out, "--recipe", split_recipe, cwd=tmp_path).returncode == 0


def test_an_unreadable_input_gets_a_reject_row(videos, split_recipe, tmp_path):
    locked = tmp_path / "locked.mp4"
    locked.write_bytes(Path(videos[1]).read_bytes())
    locked.chmod(0o000)
    result = unprivileged_cli(videos[0], locked, "--out", tmp_path / "out", "--recipe", split_recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rejects = read_clips(tmp_path / "out", kind="rejects").to_pylist()
    assert [(r["source"], r["reason"]) for r in rejects] == [(str(locked), "unreadable")]
    assert read_clips(tmp_path / "out").column("source").to_pylist() == [videos[0]]
    locked.chmod(0o644)  # control: readable, the same file is a clip
    again = unprivileged_cli(locked, "--out", tmp_path / "again", "--recipe", split_recipe, cwd=tmp_path)
    assert again.returncode == 0 and read_clips(tmp_path / "again", kind="rejects") is None


def test_a_different_recipe_stops_unless_allowed(videos, split_recipe, tmp_path):
    out = tmp_path / "out"
    assert cli(videos[0], "--out", out, "--recipe", split_recipe).exit_code == 0
    same = cli(*videos, "--out", out, "--recipe", split_recipe)  # control: the same recipe adds to it
    assert same.exit_code == 0, same.output
    other = tmp_path / "other.yaml"
    other.write_text(json.dumps({"name": "split", "stages": [{**SPLIT, "params": {"min_clip_s": 1.0}}]}))
    refused = cli(*videos, "--out", out, "--recipe", other)
    assert refused.exit_code == 2 and "another recipe" in refused.output and "--allow-recipe-change" in refused.output
    rescheduled = tmp_path / "workers.yaml"  # workers and batch sizes do not change rows
    rescheduled.write_text(json.dumps({"name": "split", "stages": [{**SPLIT, "workers": 2, "batch_size": 4}]}))
    assert cli(*videos, "--out", out, "--recipe", rescheduled).exit_code == 0
    allowed = cli(*videos, "--out", out, "--recipe", other, "--allow-recipe-change")
    assert allowed.exit_code == 0, allowed.output


def test_rerun_with_nothing_to_do_starts_no_executor_and_clears_stale_temporaries(
        videos, monkeypatch, tmp_path):
    recipe = Recipe(name="split", stages=[SPLIT])
    curate(recipe, videos[:1], tmp_path, executor="sequential")
    stale = tmp_path / ".tmp-clips-0123.parquet"
    stale.write_bytes(b"half a shard")
    started = []
    monkeypatch.setattr(runner, "run_sequential", lambda *a: started.append(a))
    stats = curate(recipe, videos[:1], tmp_path, executor="sequential")
    assert stats.videos_skipped == 1 and started == [] and not stale.exists()
    curate(recipe, videos, tmp_path, executor="sequential")  # control: new work starts the executor
    assert len(started) == 1


@pytest.mark.parametrize("error, code, message", [
    (OSError(28, "No space left on device", "clips-x.parquet"), 2, "No space left on device (clips-x.parquet)"),
    (RuntimeError("a bug"), 1, "RuntimeError: a bug (full traceback: "),
])
def test_a_failure_while_writing_is_one_line(videos, split_recipe, monkeypatch, tmp_path, error, code, message):
    def fail(*args):
        raise error

    monkeypatch.setattr("lafid.shards.write_atomic", fail)
    result = cli(videos[0], "--out", tmp_path / "out", "--recipe", split_recipe)
    text = " ".join(result.output.split())
    assert result.exit_code == code and message in text and "Traceback" not in text, result.output
    assert type(error).__name__ in (tmp_path / "out" / "_curate.log").read_text()  # the traceback is logged
    assert not list((tmp_path / "out").glob("*.parquet"))
