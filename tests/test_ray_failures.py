"""Failures of the machinery are retried, never recorded as the media's fault; broken
stages are caught by the router; a stage that cannot set up stops the run before any row.

The misbehaving stages live in tests/fault_stages.py."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import fault_stages
from lafid import media
from lafid.cli import app
from lafid.recipe import Recipe
from lafid.shards import read_clips
from lafid.router import RunFailed, SetupFailed
from lafid.runner import curate
from lafid.shards import MANIFEST

from conftest import manifest_videos, shard_rows

SPLIT = {"stage": "shot_split", "cpus": 0.25, "params": {"min_clip_s": 0.5}}


@pytest.fixture
def faults():
    fault_stages.register()
    yield
    fault_stages.unregister()


def rows(out_dir, kind="clips"):
    return shard_rows(out_dir, kind, drop=("detail",) if kind == "rejects" else ())



@pytest.fixture(scope="module")
def corpus(distinct_videos, make_video, carphone):
    """Nine videos of distinct content (three of them poison); one has a hard cut (two clips)."""
    mirrored = media.mirror(carphone)
    healthy = list(distinct_videos)
    poison = [
        make_video("f_poison10", lambda: carphone[10:], 29.97),
        make_video("f_poison30", lambda: carphone[30:], 29.97),
        make_video("f_poison_m10", lambda: mirrored[10:], 29.97),
    ]
    return healthy, poison


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_poison_inputs_cost_only_themselves_and_retry_failed_redoes_them(
        ray_cluster, faults, corpus, tmp_path):
    healthy, poison = corpus
    inputs = healthy[:3] + poison[:1] + healthy[3:5] + poison[1:] + healthy[5:]
    poison_dir = tmp_path / "poison"
    poison_dir.mkdir()
    recipe = Recipe(name="poison", max_item_retries=2, stages=[
        SPLIT, {"stage": "crash_on_marker", "workers": 2, "batch_size": 2, "params": {"poison_dir": str(poison_dir)}}])
    clean = tmp_path / "clean"
    curate(recipe, inputs, clean, executor="sequential")  # nothing poisoned yet: the truth
    healthy_clips = [r for r in rows(clean) if json.loads(r)["source"] in healthy]
    assert len(healthy_clips) == 7  # six videos, the cut one gives two clips

    for path in poison:
        (poison_dir / Path(path).name).touch()
    out = tmp_path / "out"
    stats = curate(recipe, inputs, out, executor="ray")
    assert stats.videos_done == 9
    assert rows(out) == healthy_clips  # every healthy clip kept, though batches with poison died
    rejects = read_clips(out, kind="rejects").to_pylist()
    assert sorted(r["source"] for r in rejects) == sorted(poison)
    assert {(r["stage"], r["reason"]) for r in rejects} == {("crash_on_marker", "worker_crashed")}
    assert all("died 2 times" in r["detail"] and "\x1b" not in r["detail"] for r in rejects)

    for marker in poison_dir.iterdir():
        marker.unlink()
    again = curate(recipe, inputs, out, executor="ray")
    assert again.videos_skipped == 9 and again.videos_done == 0  # rejects are final without --retry-failed
    retried = curate(recipe, inputs, out, executor="ray", retry_failed=True)
    assert retried.videos_done == 3 and retried.kept == 3
    assert rows(out) == rows(clean) and read_clips(out, kind="rejects") is None
    done = manifest_videos(out)
    assert len(done) == len(set(done)) == 9


@pytest.mark.parametrize("executor, pools", [("sequential", "per_stage"), pytest.param("ray", "per_stage", marks=pytest.mark.ray),
                                             pytest.param("ray", "chain", marks=pytest.mark.ray)])
def test_setup_failure_stops_the_run_before_any_row(request, executor, pools, faults, corpus, tmp_path):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    healthy, _ = corpus
    recipe = Recipe(name="setup", pools=pools,
                    stages=[SPLIT, {"stage": "fail_setup", "params": {"model_dir": "/no/such/model"}}])
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe.model_dump()))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["curate", *healthy[:2], "--out", str(out), "--recipe", str(path),
                                      "--executor", executor, "--no-progress"])
    # the stage's own error on one line, non-zero exit, the traceback in the run's log, no row
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "'fail_setup' failed to set up: FileNotFoundError: model_dir /no/such/model" \
        " does not exist" in text and "Traceback" not in text
    assert "Traceback" in (out / "_curate.log").read_text()
    assert not list(out.glob("*.parquet")) and not (out / MANIFEST).exists()
    if executor == "sequential":  # the same as an exception for callers of the library
        with pytest.raises(SetupFailed, match="model_dir /no/such/model does not exist"):
            curate(recipe, healthy[:2], out, executor=executor)


@pytest.mark.parametrize("executor", ["sequential", pytest.param("ray", marks=pytest.mark.ray)])
@pytest.mark.timeout(300)
def test_a_stage_that_drops_or_doubles_a_clip_gets_a_stage_error_row(
        request, executor, faults, make_video, carphone, tmp_path):
    if executor == "ray":
        request.getfixturevalue("ray_cluster")
    inputs = [make_video("m_keep", lambda: carphone, 29.97),
              make_video("m_drop", lambda: carphone[5:], 29.97),
              make_video("m_dup", lambda: carphone[15:], 29.97)]
    recipe = Recipe(name="misroute", stages=[SPLIT, {"stage": "misroute"}])
    stats = curate(recipe, inputs, tmp_path, executor=executor)
    assert stats.videos_done == 3
    assert read_clips(tmp_path).column("source").to_pylist() == [inputs[0]]
    rejects = {r["source"]: r for r in read_clips(tmp_path, kind="rejects").to_pylist()}
    assert set(rejects) == set(inputs[1:])  # one row each: the doubled clip is not written twice
    assert rejects[inputs[1]]["reason"] == rejects[inputs[2]]["reason"] == "stage_error"
    assert rejects[inputs[1]]["detail"] == "returned no item for this clip"
    assert rejects[inputs[2]]["detail"] == "returned 2 items for this clip"
    assert rejects[inputs[1]]["clip_index"] == rejects[inputs[2]]["clip_index"] == 0
    assert sorted(manifest_videos(tmp_path)) == sorted(set(manifest_videos(tmp_path)))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_pool_that_cannot_replace_its_dead_workers_fails_the_run(ray_cluster, faults, corpus, tmp_path):
    healthy, _ = corpus
    recipe = Recipe(name="broken", stages=[SPLIT, {"stage": "crash_and_break",
                                                   "params": {"broken": str(tmp_path / "broken")}}])
    with pytest.raises(RunFailed, match="'crash_and_break' has no live worker and cannot start one: .*device lost"):
        curate(recipe, healthy[:2], tmp_path / "out", executor="ray")
    assert not list((tmp_path / "out").glob("*.parquet"))  # nothing recorded as done
    assert "RuntimeError: device lost" in (tmp_path / "out" / "_curate.log").read_text()


def test_retry_failed_replaces_rows_only_of_videos_it_is_given(faults, make_video, carphone, tmp_path):
    keep, drop = make_video("m_keep", lambda: carphone, 29.97), make_video("m_drop", lambda: carphone[5:], 29.97)
    other = make_video("r_drop_other", lambda: carphone[25:], 29.97)
    recipe = Recipe(name="misroute", stages=[SPLIT, {"stage": "misroute"}])
    curate(recipe, [keep, drop, other], tmp_path, executor="sequential")
    before = rows(tmp_path, "rejects")
    assert len(before) == 2
    stats = curate(recipe, [keep, drop], tmp_path, executor="sequential", retry_failed=True)
    assert stats.videos_done == 1 and stats.videos_skipped == 1  # only the failed video is redone
    assert rows(tmp_path, "rejects") == before  # replaced by the same row; the one not given is untouched
    assert rows(tmp_path, "rejects") != [] and sorted(manifest_videos(tmp_path)) == sorted(set(manifest_videos(tmp_path)))
    assert len(manifest_videos(tmp_path)) == 3


def _kill_first_setup(pid_dir: Path, killed: list[int], titles: list[str]) -> None:
    """Kill -9 the first process that starts setting up, then let every later setup finish. Records the
    killed process's title as `ps` shows it."""
    import os
    import signal
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = [p for p in pid_dir.iterdir() if p.name.isdigit()]
        if pids:
            killed.append(int(pids[0].name))
            titles.append(Path(f"/proc/{killed[0]}/cmdline").read_bytes().split(b"\0")[0].decode())
            os.kill(killed[0], signal.SIGKILL)
            break
        time.sleep(0.05)
    (pid_dir / "go").touch()


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("retries", [3, 0])  # 0: the control, as before (a death in setup stopped the run)
def test_a_worker_killed_while_setting_up_is_replaced(ray_cluster, faults, corpus, tmp_path, monkeypatch, retries):
    import threading

    from lafid.ray_executor import pool

    healthy, _ = corpus
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    recipe = Recipe(name="slow", stages=[SPLIT, {"stage": "slow_setup", "workers": 1,
                                                 "params": {"pid_dir": str(pid_dir)}}])
    clean = tmp_path / "clean"
    (pid_dir / "go").touch()
    curate(recipe, healthy[:3], clean, executor="sequential")
    for p in pid_dir.iterdir():
        p.unlink()
    monkeypatch.setattr(pool, "SETUP_RETRIES", retries)
    killed: list[int] = []
    titles: list[str] = []
    killer = threading.Thread(target=_kill_first_setup, args=(pid_dir, killed, titles))
    killer.start()
    out = tmp_path / "out"
    try:
        if retries == 0:
            with pytest.raises(SetupFailed, match="'slow_setup' failed to set up: its worker died while setting up, 1 time"):
                curate(recipe, healthy[:3], out, executor="ray")
            assert not list(out.glob("*.parquet"))
            return
        stats = curate(recipe, healthy[:3], out, executor="ray")
    finally:
        killer.join()
    assert titles[0].startswith("ray::slow_setup")  # `ps` names the stage, not ray::StageActor
    assert len(killed) == 1 and len([p for p in pid_dir.iterdir() if p.name.isdigit()]) == 2  # one replacement
    assert stats.videos_done == 3 and rows(out) == rows(clean) != []  # the same rows as a clean run
    assert "died while setting up" in (out / "_curate.log").read_text()
