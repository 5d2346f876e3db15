"""The driver: start every pool, stream videos through them with a bounded window, route summaries,
and say what the run did (`RunInfo`)."""

from __future__ import annotations

import logging
import pickle
import time
from collections import Counter

import ray
from ray.exceptions import ObjectLostError, RayError, RayTaskError

from lafid.item import Item
from lafid.progress import RunInfo
from lafid.ray_executor.cluster import init_ray, shutdown_ray
from lafid.ray_executor.plan import chain_plan, plan_pools
from lafid.ray_executor.actor import item_key
from lafid.ray_executor.pool import Pool, one_line
from lafid.recipe import Recipe
from lafid.router import Router, RunFailed, setup_failed

log = logging.getLogger("lafid.run")

TICK_S = 0.5  # how often the driver looks at queues and free resources
# Batches running at once, per CPU of the cluster (None: as many as there are idle actors). Actors ask for a
# fraction of a CPU so that every stage has one, but more batches than cores only time-share them: with 3.2
# running at once on 2 cores the stages took 24 % more CPU per video-second than in one process
# (benchmarks/curate_throughput.py).
BATCHES_PER_CPU: float | None = 1.0


def run_ray(recipe: Recipe, items, router: Router, address: str | None = None,
            num_cpus: int | None = None) -> RunInfo:
    """Run `items` through one pool per stage of `recipe`, or one pool that runs the whole chain of stages
    (`plan.chain_plan`), starting (or joining) Ray for the run."""
    info = RunInfo()
    begun = time.monotonic()
    started = init_ray(address, num_cpus)
    stages = recipe.build_stages()
    pools: list[Pool] = []
    native = router.stats.native_log  # the run's own log (lafid.runner), which workers append to
    try:
        chain = chain_plan(recipe, stages)
        if chain:  # whole videos in, rows out: the router sees one step
            pools.append(Pool(stages, chain, recipe.stages[0].batch_size, last=True,
                              max_item_retries=recipe.max_item_retries, native_log=native))
        else:
            plans = plan_pools(recipe, stages)
            for i, (stage, spec, plan) in enumerate(zip(stages, recipe.stages, plans)):
                pools.append(Pool([stage], plan, spec.batch_size, last=i == len(stages) - 1,
                                  max_item_retries=recipe.max_item_retries, native_log=native))
        router.steps = [pool.name for pool in pools]
        info.requests = {pool.name: pool.plan.cpus for pool in pools}
        log.info("pools: %s%s", ", ".join(f"{p.name} {p.plan.low}..{p.plan.high or 'fit'} x {p.plan.cpus:g} CPU"
                                          for p in pools),
                 f" (each actor runs {' > '.join(s.name for s in stages)})" if chain else "")
        _wait_ready(pools)
        info.setup_s = time.monotonic() - begun
        Stream(recipe, pools, router, info).run(iter(items))
    finally:
        for pool in pools:
            info.peak_actors[pool.name] = pool.peak
            info.retired[pool.name] = pool.retired
            info.started[pool.name] = pool.started_actors
            info.startup_cpu_s[pool.name] = pool.startup_cpu_s
            pool.close()
        if started:
            shutdown_ray()
        if info.items:
            log.info("driver received %d bytes of summaries for %d items (%d bytes per item)", info.driver_bytes,
                     info.items, info.driver_bytes // max(1, info.items))
    return info


def _wait_ready(pools: list[Pool]) -> None:
    """Every actor of every pool set up (replacements of those that died included), or the run stops
    with the first stage's own error."""
    refs = {ref: pool for pool in pools for ref in pool.starting}
    while refs:
        ray.wait(list(refs), num_returns=len(refs))
        for ref, pool in refs.items():
            error = pool.started(ref)
            if error:
                raise setup_failed(pool.failed_stage, error)
        refs = {ref: pool for pool in pools for ref in pool.starting}



def _lost_data(exc: BaseException) -> bool:
    """The call failed because an object it needed was lost (with a node), not because of its worker."""
    return isinstance(exc, ObjectLostError) or isinstance(getattr(exc, "cause", None), ObjectLostError)



class Stream:
    """The driver loop: admit videos, hand batches (object references) to pools, route summaries."""

    def __init__(self, recipe: Recipe, pools: list[Pool], router: Router, info: RunInfo):
        self.recipe = recipe
        self.info = info
        self.pools = pools
        self.router = router
        self.where: dict[tuple[str, int], object] = {}  # item key -> ref of the pool output holding it
        self.epoch: Counter = Counter()  # video -> times it went back to the first stage
        self.running: dict = {}  # summary ref -> (stage index, actor, batch, items ref, epochs)
        self.next_tick = 0.0
        self.started = self.counted = time.monotonic()
        cpus = ray.cluster_resources().get("CPU", 1.0)
        self.max_running = None if BATCHES_PER_CPU is None else max(1, int(BATCHES_PER_CPU * cpus))

    def run(self, source) -> None:
        pools, router = self.pools, self.router
        exhausted = False
        while True:
            while not exhausted and router.open_videos < self.recipe.max_videos_in_flight:
                item = next(source, None)
                if item is None:
                    exhausted = True
                else:
                    pools[0].queue.extend(router.admit(item))
            for index in reversed(range(len(pools))):  # drain later stages first
                pool = pools[index]
                while pool.idle and pool.has_work and self.has_room:
                    self.submit(index, *pool.take())
            self.scale()
            starting = {ref: pool for pool in pools for ref in pool.starting}
            if not self.running and exhausted and not any(pool.has_work for pool in pools):
                self.count_working()
                return  # replacements still starting are not waited for
            if not self.running and not starting:
                # nothing can move: no worker to give the waiting items to, or videos lost in flight
                raise RunFailed(f"the run cannot go on: {router.open_videos} videos in flight, "
                                f"{sum(len(p.queue) + len(p.alone) for p in pools)} items waiting, no live worker")
            ready, _ = ray.wait([*self.running, *starting], num_returns=1, timeout=TICK_S)
            for ref in ready:
                if ref in starting:
                    pool = starting[ref]
                    if pool.started(ref) and not pool.alive:
                        raise RunFailed(f"stage {pool.name!r} has no live worker and cannot start one: "
                                        f"{pool.last_error}")
                    continue
                self.finished(ref)

    @property
    def has_room(self) -> bool:
        """Another batch may start (BATCHES_PER_CPU)."""
        return self.max_running is None or len(self.running) < self.max_running

    def submit(self, index: int, actor, batch: list[Item]) -> None:
        direct, picks, parts, where = [], [], [], {}
        for item in batch:
            ref = self.where.get(item_key(item))
            if ref is None:
                direct.append(item)
                continue
            if ref not in where:
                where[ref] = len(parts)
                parts.append(ref)
                picks.append([])
            picks[where[ref]].append(item_key(item))
        items_ref, summary_ref = actor.run.options(num_returns=2).remote(direct, picks, *parts)
        epochs = {i.video_id: self.epoch[i.video_id] for i in batch}
        self.count_working()
        self.running[summary_ref] = (index, actor, batch, items_ref, epochs)

    def finished(self, ref) -> None:
        self.count_working()
        index, actor, batch, items_ref, epochs = self.running.pop(ref)
        pool = self.pools[index]
        try:
            stats, out = ray.get(ref)
        except RayError as exc:
            if _lost_data(exc):  # an input object went with its node: the worker is fine
                pool.returned(actor)
                self.restart(batch, exc)
                return
            if isinstance(exc, RayTaskError):  # the call failed around the stage (StageWorker catches the stage's own)
                pool.returned(actor)
                out = [i.drop(pool.name, "stage_error", one_line(exc)) for i in batch]
            else:  # the worker process is gone: infrastructure, not this media
                out = pool.died(actor, batch, exc)
                batch = out  # only the items rejected now are settled; the rest are queued again
        else:
            pool.returned(actor)
            for name, batch_stats in stats:  # per stage, also inside a chain
                self.router.stats.stage(name, batch_stats)
            self.info.driver_bytes += len(pickle.dumps((stats, out), protocol=5))
            self.info.row_bytes += len(pickle.dumps([i.columns for i in out if i.columns], protocol=5))
            self.info.summaries += 1
            self.info.items += len(out)
        stale = {v for v, e in epochs.items() if self.epoch[v] != e}
        if stale:  # videos sent back to the first stage while this batch ran: its results are void
            batch = [i for i in batch if i.video_id not in stale]
            out = [i for i in out if i.video_id not in stale]
        if not batch:
            return
        for item in batch:
            self.where.pop(item_key(item), None)
        onward = self.router.done(index, batch, out)
        if index + 1 < len(self.pools):
            for item in onward:
                self.where[item_key(item)] = items_ref
            self.pools[index + 1].queue.extend(onward)

    def count_working(self) -> None:
        """Add the time since the last change to `RunInfo.working_s` under the number of batches running:
        with fewer than the cluster's CPUs, cores sat idle."""
        now = time.monotonic()
        working = self.info.working_s
        working[len(self.running)] = working.get(len(self.running), 0.0) + now - self.counted
        self.counted = now

    def restart(self, batch: list[Item], exc: BaseException) -> None:
        """The working data of `batch` was lost (its node left the cluster): every video in it goes
        back to the first stage; their rows are written only when they come through again."""
        videos = {i.video_id: i.source for i in batch}
        log.warning("working data of %d video(s) was lost (%s); they start again", len(videos), one_line(exc))
        for video_id, source in videos.items():
            if not self.router.is_open(video_id):
                continue
            self.epoch[video_id] += 1
            for pool in self.pools:
                pool.forget(video_id)
            for key in [k for k in self.where if k[0] == video_id]:
                del self.where[key]
            self.pools[0].queue.extend(self.router.restart(video_id, source))
            self.info.restarted_videos += 1

    def scale(self) -> None:
        """Grow pools whose queue outlasts starting an actor (`Pool.can_grow`; one actor per pool per tick,
        the longest backlog first, in the cluster's free room or an idle actor's of a pool with nothing
        queued) and give back actors idle for IDLE_S."""
        now = time.monotonic()
        if now < self.next_tick:
            return
        self.next_tick = now + TICK_S
        sizes = {p.name: p.size for p in self.pools}
        if not self.info.sizes or self.info.sizes[-1][1] != sizes:  # a step function: changes only
            self.info.sizes.append((now - self.started, sizes))
        for pool in self.pools:
            pool.shrink(now)
        growing = sorted((p for p in self.pools if p.can_grow(now)), key=lambda p: -p.backlog_s(now))
        if not growing:
            return
        free = ray.available_resources()
        cpu, gpu = free.get("CPU", 0.0), free.get("GPU", 0.0)
        for pool in self.pools:  # actors asked for but not yet placed hold nothing yet: count them as taken
            cpu -= pool.plan.cpus * len(pool.starting)
            gpu -= pool.plan.gpus * len(pool.starting)
        for pool in growing:  # one actor per pool per tick: actors take seconds to start
            donor = None
            if pool.plan.cpus > cpu + 1e-9 or pool.plan.gpus > gpu + 1e-9:
                # no room: an idle actor of a pool with nothing queued leaves now, not after IDLE_S, and its room
                # goes to this pool (Ray places the new actor as soon as the old one is gone). The donor's stage
                # will likely need an actor again, so the queue must outlast two starts, this pool's and the
                # donor's: with one, face and shot splitting traded an actor 4 times per `talking3` run.
                donor = next((p for p in self.pools if p is not pool and p.can_give()
                              and pool.plan.cpus <= cpu + p.plan.cpus + 1e-9
                              and pool.plan.gpus <= gpu + p.plan.gpus + 1e-9
                              and pool.outlasts_starts(now, pool, p)), None)
                if donor is None or not donor.shrink(now, idle_s=0.0, limit=1):
                    continue
                cpu, gpu = cpu + donor.plan.cpus, gpu + donor.plan.gpus
            log.info("stage %s: %d batches wait (%.1f s per actor), starting actor %d%s", pool.name,
                     pool.waiting_batches, pool.backlog_s(now), pool.size + 1,
                     f" in the room of an idle {donor.name} actor" if donor else "")
            pool.spawn()
            cpu -= pool.plan.cpus
            gpu -= pool.plan.gpus
