"""`lafid curate` on real footage prints only lafid's own lines, in both executors; what native
libraries (TFLite/mediapipe `W0000`, glog, libav) and dependencies' warnings print is in `_native.log`."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lafid import devset, runner
from lafid.recipe import Recipe
from lafid.run_record import read_runs
from lafid.runner import curate

REPO = Path(__file__).resolve().parents[1]
# lafid's own lines: the recipe used, the run table, the reject table, where the native lines went, the output
OWN = re.compile(r"^(recipe: |output: |native library messages: \d+ lines in |\s*videos \d|\s*rejects by stage|"
                 r"[┏┃┡│└]|\s*$)")
NATIVE = re.compile(r"W0000|XNNPACK|absl::|FutureWarning|swscaler|\(raylet\)")


@pytest.fixture(scope="module")
def talking_clip():
    return str(devset.ensure() / "jwpIntro.mp4")


@pytest.mark.parametrize("executor", ["sequential", pytest.param("ray", marks=pytest.mark.ray)])
@pytest.mark.timeout(300)
def test_a_run_prints_only_lafid_lines_and_native_output_goes_to_its_log(executor, talking_clip, tmp_path):
    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "lafid.cli", "curate", talking_clip, "--out", "out", "--recipe",
                          "demo", "--executor", executor, "--num-cpus", "2", "--no-progress"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""
    strangers = [line for line in run.stderr.splitlines() if not OWN.match(line)]
    assert strangers == [], strangers
    native = (tmp_path / "out" / "_native.log").read_text()
    assert re.search(r"W0000|XNNPACK", native), native  # mediapipe's graph set up: it wrote there
    count = int(re.search(r"native library messages: (\d+) lines", run.stderr).group(1))
    assert count == len(native.splitlines())


def test_control_without_the_redirect_native_lines_reach_the_terminal(talking_clip, tmp_path, capfd, monkeypatch):
    recipe = Recipe(name="faces", stages=[{"stage": "shot_split", "params": {"min_clip_s": 0.5}},
                                          {"stage": "face_constraints", "params": {"sample_fps": 2.0}}])
    monkeypatch.setattr(runner, "native_output_to", lambda path: contextlib.nullcontext())
    curate(recipe, [talking_clip], tmp_path / "bare", executor="sequential")
    assert NATIVE.search(capfd.readouterr().err)
    monkeypatch.undo()
    stats = curate(recipe, [talking_clip], tmp_path / "quiet", executor="sequential")
    captured = capfd.readouterr()
    assert not NATIVE.search(captured.err + captured.out)
    assert stats.native_lines and NATIVE.search((tmp_path / "quiet" / "_native.log").read_text())


@pytest.fixture
def gate_stage():
    import fault_stages

    fault_stages.register()
    yield
    fault_stages.unregister()


def _raylet_says(message: str, out: Path, gate: Path) -> None:
    """Once the run is under way, Ray's GCS tells the driver something (as the raylet does when the OOM
    killer takes a worker), then the held items are let go."""
    import time

    import ray
    from ray._private.utils import publish_error_to_driver

    deadline = time.monotonic() + 60
    while not (out / "_native.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    publish_error_to_driver("oom", message, gcs_client=ray._private.worker.global_worker.gcs_client)
    time.sleep(2.0)  # the driver prints such messages from a background thread
    gate.touch()


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("redirect", [True, False])  # False: the control, without lafid.native
def test_raylet_messages_during_a_ray_run_go_to_the_native_log(ray_cluster, gate_stage, talking_clip, tmp_path,
                                                               capfd, monkeypatch, redirect):
    import threading

    if not redirect:
        monkeypatch.setattr(runner, "native_output_to", lambda path: contextlib.nullcontext())
    message = f"A worker died or was killed: OOM killer test {redirect}"
    gate, out = tmp_path / "open", tmp_path / "out"
    if not redirect:
        out.mkdir()
        (out / "_native.log").touch()  # the thread's cue that the run started
    recipe = Recipe(name="gate", stages=[{"stage": "shot_split", "params": {"min_clip_s": 0.5}},
                                         {"stage": "gate", "params": {"open_when": str(gate)}}])
    talker = threading.Thread(target=_raylet_says, args=(message, out, gate))
    talker.start()
    try:
        stats = curate(recipe, [talking_clip], out, executor="ray")
    finally:
        talker.join()
    assert stats.kept == 1
    captured = capfd.readouterr()
    on_terminal = message in captured.out + captured.err
    assert on_terminal != redirect
    assert (message in (out / "_native.log").read_text()) == redirect


def test_ctrl_c_says_how_to_go_on_and_a_rerun_resumes(talking_clip, tmp_path):
    import signal
    import time

    env = {**os.environ, "COLUMNS": "120", "PYTHONPATH": str(REPO)}
    recipe = tmp_path / "faces.yaml"
    recipe.write_text('{"name": "faces", "stages": [{"stage": "shot_split"}, {"stage": "face_constraints"}]}')
    cmd = [sys.executable, "-m", "lafid.cli", "curate", talking_clip, "--out", "out", "--recipe", str(recipe),
           "--executor", "sequential", "--no-progress"]
    run = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "_native.log").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the executor has started: stages are setting up
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130 and err.splitlines()[-1] == "interrupted; rerun to resume", err
    assert "Traceback" not in err and "Traceback" not in (tmp_path / "out" / "_curate.log").read_text()
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert again.returncode == 0 and "videos 1/1" in again.stderr, again.stderr
    # the run record says how each run ended
    assert [r["outcome"] for r in read_runs(tmp_path / "out")] == ["interrupted", "done"]
