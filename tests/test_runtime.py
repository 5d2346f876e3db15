"""The Ray runtime: pools sized from the cluster, data kept in the object store, faults of
workers and nodes. The stages that carry large data are in tests/runtime_stages.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import runtime_stages
from lafid.ray_executor import plan, pool, stream
from lafid.progress import RunInfo
from lafid.recipe import Recipe, RecipeError, load_recipe
from lafid.shards import read_clips
from lafid.runner import curate

from conftest import manifest_videos
from conftest import shard_rows as rows

SPLIT = {"stage": "shot_split", "cpus": 0.25, "params": {"min_clip_s": 0.5}}


@pytest.fixture
def carry_stages():
    runtime_stages.register()
    yield
    runtime_stages.unregister()



@pytest.fixture(scope="module")
def videos(distinct_videos):
    return distinct_videos


def carry_recipe(workers="auto", delay_s=0.0, pid_dir="", megabytes=1.0, rows_per_shard=1000, pools="per_stage"):
    return Recipe(name="carry", max_videos_in_flight=6, output={"rows_per_shard": rows_per_shard}, pools=pools, stages=[
        SPLIT, {"stage": "carry", "workers": workers, "params": {"megabytes": megabytes}},
        {"stage": "weigh", "workers": workers, "params": {"delay_s": delay_s, "pid_dir": pid_dir}}])


def test_stage_workers_measure_their_own_cpu_time_apart_from_wall_time():
    """BatchStats.cpu_seconds is the process's CPU time during the call (the benchmark's CPU-s per
    video-second): a stage that waits costs wall time and no CPU; one that fills 256 MB costs CPU."""
    from lafid.item import Item
    from lafid.stage import StageWorker

    item = Item(source="x.mp4", video_id="v", clip_index=0, clip_count=1, start_s=0.0, end_s=1.0)
    item.work["blob"] = np.zeros(1, np.uint8)
    _, waited = StageWorker(runtime_stages.Weigh({"delay_s": 0.5})).run([item])
    _, worked = StageWorker(runtime_stages.Carry({"megabytes": 256})).run([item])
    assert waited.seconds >= 0.5 and waited.cpu_seconds < 0.1
    assert worked.cpu_seconds > 0.02 and worked.cpu_seconds > waited.cpu_seconds


def test_workers_may_be_a_number_auto_or_a_range():
    recipe = Recipe(name="w", stages=[{"stage": "shot_split"}, {"stage": "face_constraints", "workers": 3},
                                      {"stage": "identity_consistency", "workers": {"min": 2, "max": 5}}])
    assert [s.worker_range for s in recipe.stages] == [(1, None), (3, 3), (2, 5)]
    assert all(s.workers == "auto" for s in load_recipe("lafid180k").stages)
    for bad, message in (({"min": 3, "max": 2}, "below min"), (0, "greater than or equal"), ("many", "auto")):
        with pytest.raises(ValueError, match=message):
            Recipe(name="w", stages=[{"stage": "shot_split", "workers": bad}])


_SET_UP_EVERY_STAGE = """
import sys
{pre}
from lafid.recipe import load_recipe
from lafid.stage import StageWorker
for stage in load_recipe("lafid180k").build_stages():
    StageWorker(stage).close()
loaded = "torch" in sys.modules
import torch
print(loaded, torch.get_num_threads())
"""


@pytest.mark.parametrize("pre, loaded", [("", "False"), ("import torch", "True")])
def test_setting_up_the_default_stages_does_not_import_torch(pre, loaded):
    """A worker that sets up the default recipe's stages does not load torch (~2.5 CPU-s and 200 MB per
    actor); where torch is already loaded, its threads are pinned to the stage's. Control: torch loaded first."""
    out = subprocess.run([sys.executable, "-c", _SET_UP_EVERY_STAGE.replace("{pre}", pre)], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == [loaded, "1"]  # one thread: pinned by the stages, or by OMP_NUM_THREADS


@pytest.mark.ray
def test_default_recipe_fits_two_cpus_and_explicit_requests_that_cannot_fit_fail(ray_cluster, monkeypatch):
    recipe = load_recipe("lafid180k")
    plans = plan.plan_pools(recipe, recipe.build_stages())
    assert len(plans) == 4 and all(p.low == 1 and p.high is None for p in plans)
    # one actor per stage and one spare fit the 2 CPUs: each asks for 0.4 CPU, so the slowest stage can add
    # one actor (more actors than CPUs would not run faster). Control: without the spare, 0.5 each
    assert [p.cpus for p in plans] == [pytest.approx(0.4)] * 4
    monkeypatch.setattr(plan, "SPARE", 0)
    assert [p.cpus for p in plan.plan_pools(recipe, recipe.build_stages())] == [pytest.approx(0.5)] * 4
    fixed = recipe.model_copy(deep=True)
    for spec in fixed.stages:  # the same stages asking for one whole-CPU actor each cannot all be placed
        spec.workers = 1
    with pytest.raises(RecipeError, match="asks for 4 CPUs .* but the cluster has 2"):
        plan.plan_pools(fixed, fixed.build_stages())
    gpu = recipe.model_copy(deep=True)
    gpu.stages[1].gpus = 0.25
    with pytest.raises(RecipeError, match="'face_constraints' asks for 1 x 0.25 GPUs but the cluster has 0"):
        plan.plan_pools(gpu, gpu.build_stages())


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_pool_grows_only_when_its_queue_outlasts_starting_an_actor(ray_cluster, carry_stages, monkeypatch):
    """An actor costs its stage's start-up before it does any work: a queue the pool drains sooner keeps the
    actors it has, a longer one gets another. Control: GROW_AFTER 0 (growing on any queue, as before)."""
    recipe = Recipe(name="grow", stages=[{"stage": "carry", "cpus": 4}])
    stages = recipe.build_stages()
    (sized,) = plan.plan_pools(recipe, stages)
    carry = pool.Pool(stages[:1], sized, batch_size=1, last=True, max_item_retries=2, native_log=None)
    try:
        (ref,) = carry.starting
        ray_cluster.wait([ref])
        assert carry.started(ref) is None and carry.started_actors == 1 and carry.startup_s > 0
        # the actors hold a share of the 2 CPUs, and their thread pools follow it; the recipe's stage keeps 4
        assert sized.cpus < 2 and carry.stages[0].resources.threads == 1 and stages[0].resources.threads == 4
        carry.startup_s, carry.batches, carry.batch_s = 3.0, 4, 2.0  # an actor took 3 s to start, a batch 0.5 s
        now = time.monotonic()
        carry.queue.extend(runtime_stages.Item(source="x", video_id=f"v{i}", clip_index=0) for i in range(4))
        assert carry.backlog_s(now) == pytest.approx(2.0) and not carry.can_grow(now)  # 2 s of work: no
        monkeypatch.setattr(pool, "GROW_AFTER", 0.0)
        assert carry.can_grow(now)  # control
        monkeypatch.undo()
        carry.queue.extend(runtime_stages.Item(source="x", video_id=f"w{i}", clip_index=0) for i in range(6))
        assert carry.backlog_s(now) == pytest.approx(5.0) and carry.can_grow(now)  # 5 s of work: one more actor
    finally:
        carry.close()


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_pool_with_work_takes_the_room_of_an_idle_actor_at_once(ray_cluster, carry_stages):
    """A full cluster: a pool with batches waiting gets the room of another pool's idle actor in the same look,
    and Ray places its new actor there. Controls: an actor whose pool has work queued is not given away, nor
    one whose restart would come before the queue that asked for it is done."""
    recipe = Recipe(name="room", stages=[{"stage": "carry", "cpus": 1}, {"stage": "weigh", "cpus": 1}])
    carry_stage, weigh_stage = recipe.build_stages()
    carry = pool.Pool([carry_stage], plan.Plan(1, None, 1.0, 0.0), 1, last=False, max_item_retries=2, native_log=None)
    weigh = pool.Pool([weigh_stage], plan.Plan(0, None, 1.0, 0.0), 1, last=True, max_item_retries=2, native_log=None)
    try:
        carry.spawn()  # two 1-CPU actors fill the 2-CPU cluster
        while carry.starting:
            (ref,), _ = ray_cluster.wait(list(carry.starting))
            assert carry.started(ref) is None
        weigh.queue.extend(runtime_stages.Item(source="x", video_id=f"v{i}", clip_index=0) for i in range(3))
        carry.queue.append(runtime_stages.Item(source="x", video_id="c", clip_index=0))
        weigh.batches, weigh.batch_s = 1, 10.0  # 3 batches of 10 s wait: far longer than two actors' start-up
        driver = stream.Stream(recipe, [carry, weigh], router=None, info=RunInfo())
        driver.scale()
        assert carry.size == 2 and weigh.size == 0  # control: carry has work queued, its idle actors stay
        carry.queue.clear()
        weigh.batch_s = carry.startup_each_s / 10  # control: the queue would be gone before carry's next start
        driver.next_tick = 0.0
        driver.scale()
        assert carry.size == 2 and weigh.size == 0
        weigh.batch_s = 10.0
        driver.next_tick = 0.0
        driver.scale()
        assert carry.size == 1 and carry.retired == 1 and weigh.size == 1
        (ref,) = weigh.starting
        ready, _ = ray_cluster.wait([ref], timeout=60)
        assert ready and weigh.started(ref) is None and weigh.started_actors == 1  # placed in the room given back
    finally:
        carry.close()
        weigh.close()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_data_stays_in_the_object_store_and_pools_grow_and_shrink(
        ray_cluster, carry_stages, videos, tmp_path, monkeypatch):
    monkeypatch.setattr(pool, "IDLE_S", 0.5)
    stats = curate(carry_recipe(delay_s=2.0), videos, tmp_path, executor="ray")
    assert stats.videos_done == 6 and stats.kept == 7
    clips = read_clips(tmp_path).to_pylist()
    for row in clips:  # each clip's 1 MiB array reached the next stage intact, through the object store
        item = runtime_stages.Item(source="", video_id="", start_s=row["start_s"], end_s=row["end_s"])
        assert row["face_ratio"] == pytest.approx(runtime_stages.fill_value(item) / 255)
        assert row["face_area_median"] == 2**20
    assert len({r["face_ratio"] for r in clips}) > 1  # the values differ per clip: nothing was mixed up
    run = stats.ray
    # the driver got summaries only: about 1% of the 1 MiB each clip carried between stages
    assert run.items and run.driver_bytes / stats.kept < 2**20 / 100
    assert run.peak_actors["weigh"] >= 2  # the slow stage's pool grew with its queue
    assert run.started["weigh"] >= 2 and run.startup_cpu_s["weigh"] > 0 and run.setup_s > 0
    assert max(run.working_s) >= 2  # batches of different actors ran at once
    assert sum(run.retired.values()) >= 1  # and idle actors were given back


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_no_more_batches_run_at_once_than_the_cluster_has_cpus(ray_cluster, carry_stages, videos, tmp_path,
                                                                monkeypatch):
    """Quarter-CPU actors let every stage have one, but more batches than cores would only time-share them.
    Control: without the bound the same run has more batches at once than the 2 CPUs."""
    monkeypatch.setattr(pool, "GROW_AFTER", 0.0)  # pools grow on any queue: many actors, room for many batches
    bounded = curate(carry_recipe(delay_s=1.0), videos, tmp_path / "bounded", executor="ray").ray
    assert max(bounded.working_s) == 2
    monkeypatch.setattr(stream, "BATCHES_PER_CPU", None)
    unbounded = curate(carry_recipe(delay_s=1.0), videos, tmp_path / "unbounded", executor="ray").ray
    assert max(unbounded.working_s) > 2


@pytest.mark.ray
def test_a_small_cluster_runs_the_default_recipe_as_whole_chains(ray_cluster, monkeypatch):
    """`pools: auto` (the default recipe's): where the cluster cannot give every stage an actor of its own
    CPUs plus a spare, one pool whose actors each run every stage, as many as the nodes hold; otherwise a
    pool per stage."""
    recipe = load_recipe("lafid180k")
    assert recipe.pools == "auto"
    chain = plan.chain_plan(recipe, recipe.build_stages())
    assert (chain.low, chain.high, chain.cpus, chain.gpus) == (2, 2, 1.0, 0.0)  # 2 CPUs: two chains of 1 CPU
    assert plan.chain_plan(recipe.model_copy(update={"pools": "per_stage"}), recipe.build_stages()) is None
    gpu = recipe.model_copy(deep=True)
    gpu.stages[1].gpus = 0.25
    assert plan.chain_plan(gpu, gpu.build_stages()) is None  # a GPU stage keeps its own pool
    fixed = recipe.model_copy(deep=True)
    fixed.stages[1].workers = 2
    assert plan.chain_plan(fixed, fixed.build_stages()) is None
    big = [{"Alive": True, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(plan.ray, "nodes", lambda: big)
    monkeypatch.setattr(plan.ray, "cluster_resources", lambda: {"CPU": 8.0})
    assert plan.chain_plan(recipe, recipe.build_stages()) is None  # 8 CPUs: an actor per stage fits
    three = [{"Alive": True, "Resources": {"CPU": c}} for c in (0.0, 1.5, 1.0)]  # a head with no CPU
    monkeypatch.setattr(plan.ray, "nodes", lambda: three)
    monkeypatch.setattr(plan.ray, "cluster_resources", lambda: {"CPU": 2.5})
    assert plan.chain_plan(recipe, recipe.build_stages()).low == 2  # what each node holds, not 2.5 // 1


def test_a_chain_refuses_per_stage_gpus_and_worker_counts():
    with pytest.raises(ValueError, match="'face_constraints' asks for GPUs"):
        Recipe(name="c", pools="chain", stages=[SPLIT, {"stage": "face_constraints", "gpus": 0.5}])
    with pytest.raises(ValueError, match="'face_constraints' sets workers: 3"):
        Recipe(name="c", pools="chain", stages=[SPLIT, {"stage": "face_constraints", "workers": 3}])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_chain_pool_gives_the_rows_of_the_sequential_runner_and_each_stages_figures(
        ray_cluster, carry_stages, videos, tmp_path):
    """Each actor runs every stage on whole videos; the driver still gets each stage's figures. Control:
    the same recipe with a pool per stage runs three pools."""
    clean = tmp_path / "clean"
    curate(carry_recipe(), videos, clean, executor="sequential")
    chained = curate(carry_recipe(delay_s=0.2, pools="chain"), videos, tmp_path / "chain", executor="ray")
    assert rows(tmp_path / "chain") == rows(clean) and len(rows(clean)) == 7
    assert chained.ray.started == {"chain": 2} and chained.ray.requests == {"chain": 1.0}
    assert max(chained.ray.working_s) == 2  # both chains worked at once
    assert {name: s.items_in for name, s in chained.stages.items()} == {"shot_split": 6, "carry": 7, "weigh": 7}
    assert chained.ray.driver_bytes / chained.kept < 2**20 / 100  # working data never left the actor
    per_stage = curate(carry_recipe(pools="per_stage"), videos, tmp_path / "pools", executor="ray")
    assert set(per_stage.ray.started) == {"shot_split", "carry", "weigh"}
    assert rows(tmp_path / "pools") == rows(clean)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("pools", ["per_stage", "chain"])
def test_kill_9_of_a_stage_actor_mid_run_leaves_complete_output_without_worker_crashed(
        ray_cluster, carry_stages, videos, tmp_path, pools):
    clean = tmp_path / "clean"
    curate(carry_recipe(), videos, clean, executor="sequential")
    pids = tmp_path / "pids"
    pids.mkdir()
    killed = []

    def kill_one(stats):
        if stats.videos_done >= 1 and not killed:
            pid = int(sorted(pids.iterdir())[0].name)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    out = tmp_path / "out"
    workers = 1 if pools == "per_stage" else "auto"  # a chain: two actors on 2 CPUs, each with a `weigh` stage
    stats = curate(carry_recipe(workers=workers, delay_s=0.4, pid_dir=str(pids), pools=pools), videos, out,
                   executor="ray", on_update=kill_one)
    assert killed and len(list(pids.iterdir())) >= (2 if pools == "per_stage" else 3)  # a fresh worker replaced it
    assert stats.videos_done == 6
    assert rows(out) == rows(clean) and len(rows(out)) == 7
    assert read_clips(out, kind="rejects") is None  # no worker_crashed (or any other) row
    done = manifest_videos(out)
    assert len(done) == len(set(done)) == 6


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("pools", ["per_stage", "chain"])
def test_a_worker_node_leaves_a_three_node_cluster_mid_run(carry_stages, videos, tmp_path, pools):
    """Head plus two worker nodes; `lafid curate --address` runs; the worker node holding most actors
    is removed after the first video is recorded. The rows equal a clean single-process run's. The
    cluster has token auth on (it refuses a client without the token) and the run passes its token.
    With `pools: chain`, one chain actor per worker node: the one removed takes its video with it."""
    clean = tmp_path / "clean"
    curate(carry_recipe(), videos, clean, executor="sequential")
    recipe = tmp_path / "carry.yaml"
    recipe.write_text(json.dumps(carry_recipe(delay_s=0.5, rows_per_shard=1, pools=pools).model_dump(mode="json")))
    out = tmp_path / "out"
    script = Path(__file__).parent / "multinode_curate.py"
    env = {**os.environ, "RAY_ADDRESS": ""}
    result = subprocess.run([sys.executable, str(script), str(recipe), str(out), *videos], capture_output=True,
                            text=True, env=env, timeout=560)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0, report["output"]
    assert report["without_token"] == "UNAUTHENTICATED" and report["address"].startswith("127.0.0.1:")
    assert report["removed"] and report["removed"]["actors_on_node"] >= 1  # the node held work when it left
    assert report["removed"]["videos_done_before"] < 6  # and it left mid-run
    log = (out / "_curate.log").read_text()
    assert "a worker died" in log or "was lost" in log  # and the run noticed: actors or data went with it
    assert rows(out) == rows(clean) and len(rows(out)) == 7
    assert read_clips(out, kind="rejects") is None
    done = manifest_videos(out)
    assert len(done) == len(set(done)) == 6


def test_gpu_recipe_is_the_default_recipe_with_model_stages_on_gpus():
    """pipelines/lafid180k-gpu.yaml (used by docker/rayjob.yaml) keeps the default recipe's stages and
    parameters; only where the models run differs."""
    import yaml

    root = Path(__file__).resolve().parents[1]
    gpu, cpu = load_recipe("lafid180k-gpu"), load_recipe("lafid180k")
    assert [s.stage for s in gpu.stages] == [s.stage for s in cpu.stages]
    placement = {"device", "asr_compute_type"}
    for g, c in zip(gpu.stages, cpu.stages):
        assert {k: v for k, v in g.params.items() if k not in placement} == \
               {k: v for k, v in c.params.items() if k not in placement}, g.stage
    assert [s.gpus for s in gpu.stages] == [0, 0, 0.125, 0.25]
    job = yaml.safe_load((root / "docker" / "rayjob.yaml").read_text())
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    assert groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "--recipe lafid180k-gpu" in job["spec"]["entrypoint"]
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}  # KubeRay hands every pod a token
    assert "RAY_AUTH_MODE" not in (root / "docker" / "rayjob.yaml").read_text().split("apiVersion")[1]
