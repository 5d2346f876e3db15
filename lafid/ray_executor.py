"""The Ray executor: one actor pool per stage, streamed with a bounded window.

This is the only module that imports ray. Each stage runs in its own pool of
actors sized by the recipe (`workers`, `cpus`, `gpus`); the driver keeps at most
`max_videos_in_flight` videos between source and writer, so memory stays flat
however long the input list is. A worker that dies turns its batch into reject
rows (`worker_crashed`) and is restarted by Ray; the run goes on.
"""

from __future__ import annotations

import os
import time
from collections import deque

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError, RayTaskError

from lafid.item import Item
from lafid.recipe import Recipe, RecipeError
from lafid.stage import Stage, StageWorker

_QUIET_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


class _StageActor:
    def __init__(self, stage: Stage, last: bool):
        self.worker = StageWorker(stage, last)

    def run(self, items: list[Item]):
        return self.worker.run(items)

    def close(self) -> None:
        self.worker.close()


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start (or join) Ray; True if this call started it and must shut it down."""
    if ray.is_initialized():
        return False
    os.environ.update(_QUIET_ENV)
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                  runtime_env={"env_vars": _QUIET_ENV})
    if address:
        ray.init(address=address, **kwargs)
    else:
        # No dashboard; Ray maps a loopback node address to the machine's own address, so its
        # core services listen there (see README, "Ray and the network").
        ray.init(num_cpus=num_cpus, **kwargs)
    return True


def _check_fits(recipe: Recipe, stages: list[Stage]) -> None:
    """Pools that cannot all be placed would hang silently; fail with a clear message instead."""
    want = sum(spec.workers * stage.resources.cpus for spec, stage in zip(recipe.stages, stages))
    have = ray.cluster_resources().get("CPU", 0)
    if want > have + 1e-9:
        detail = ", ".join(f"{s.stage}: {s.workers} x {st.resources.cpus}" for s, st in zip(recipe.stages, stages))
        raise RecipeError(f"recipe {recipe.name!r} asks for {want:g} CPUs ({detail}) but the cluster has {have:g}; "
                          "lower 'workers' or 'cpus' per stage")


class _Pool:
    def __init__(self, stage: Stage, workers: int, batch_size: int, last: bool):
        res = stage.resources
        actor = ray.remote(_StageActor).options(
            num_cpus=res.cpus, num_gpus=res.gpus or None,
            memory=int(res.memory_gb * 2**30) or None, max_restarts=3, max_task_retries=0,
        )
        self.name = stage.name
        self.batch_size = batch_size
        self.actors = [actor.remote(stage, last) for _ in range(workers)]
        self.idle = deque(self.actors)
        self.queue: deque[Item] = deque()

    def close(self) -> None:
        """Tear down every actor (best effort: one that is restarting is simply killed)."""
        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=60)
            except RayError:
                pass
            ray.kill(actor)


def run_ray(recipe: Recipe, items, sink, address: str | None = None, num_cpus: int | None = None) -> None:
    started = init_ray(address, num_cpus)
    stages = recipe.build_stages()
    try:
        _check_fits(recipe, stages)
        pools = [_Pool(stage, spec.workers, spec.batch_size, last=i == len(stages) - 1)
                 for i, (stage, spec) in enumerate(zip(stages, recipe.stages))]
        _stream(recipe, pools, iter(items), sink)
        for pool in pools:
            pool.close()
    finally:
        if started:
            ray.shutdown()


def _stream(recipe: Recipe, pools: list[_Pool], source, sink) -> None:
    pending: dict = {}  # object ref -> (stage index, actor, batch)
    in_flight = 0
    exhausted = False
    while True:
        while not exhausted and in_flight < recipe.max_videos_in_flight:
            item = next(source, None)
            if item is None:
                exhausted = True
            else:
                pools[0].queue.append(item)
                in_flight += 1
        for index in reversed(range(len(pools))):  # drain later stages first
            pool = pools[index]
            while pool.idle and pool.queue:
                batch = [pool.queue.popleft() for _ in range(min(pool.batch_size, len(pool.queue)))]
                actor = pool.idle.popleft()
                pending[actor.run.remote(batch)] = (index, actor, batch)
        if not pending:
            if exhausted:
                return
            continue
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            index, actor, batch = pending.pop(ref)
            pool = pools[index]
            pool.idle.append(actor)
            try:
                out, stats = ray.get(ref)
                sink.stats.stage(pool.name, stats)
            except ActorUnavailableError:  # restarting after another batch killed it: not this batch's fault
                pool.queue.extendleft(reversed(batch))
                time.sleep(0.5)
                continue
            except (RayActorError, RayTaskError) as exc:
                reason = "worker_crashed" if isinstance(exc, RayActorError) else "stage_error"
                out = [i.drop(pool.name, reason, str(exc).splitlines()[0][:500]) for i in batch]
            for item in out:
                if item.rejected or index + 1 == len(pools):
                    in_flight -= sink.put(item)
                else:
                    pools[index + 1].queue.append(item)
