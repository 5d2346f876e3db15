"""The Ray executor: one actor pool per stage, streamed with a bounded window.

This is the only module that imports ray. Each stage runs in its own pool of
actors sized by the recipe (`workers`, `cpus`, `gpus`); the driver keeps at most
`max_videos_in_flight` videos between source and writer, so memory stays flat
however long the input list is. Where items go is decided by `lafid.router`.

Failures of the machinery are not failures of the media:
- every actor must report its stage set up before any work is handed out; a
  stage that cannot set up stops the run with its own error;
- an actor that dies leaves its pool and a fresh one is started in its place;
  its batch is retried, each item alone, and only an item that kills its worker
  `max_item_retries` times on its own becomes a `worker_crashed` reject;
- a pool left with no live actor that cannot start a new one fails the run.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
import re
import traceback
from collections import Counter, deque

import ray
from ray.exceptions import RayError, RayTaskError

from lafid.item import Item
from lafid.recipe import Recipe, RecipeError
from lafid.router import Router, RunFailed, setup_failed
from lafid.stage import Stage, StageWorker

_QUIET_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
log = logging.getLogger("lafid.run")


class _StageActor:
    def __init__(self, stage: Stage, last: bool):
        self.worker: StageWorker | None = None
        self.error: tuple[str, str] | None = None
        try:
            self.worker = StageWorker(stage, last)
        except Exception as exc:  # reported by ready(): the driver fails the run with it
            self.error = (f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def ready(self) -> tuple[str, str] | None:
        """None once the stage is set up; otherwise (error, traceback)."""
        return self.error

    def run(self, items: list[Item]):
        return self.worker.run(items)

    def close(self) -> None:
        if self.worker is not None:
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
        # core services listen there (see README, "Ray and the network"). "local": always a new
        # cluster of our own, never one named by RAY_ADDRESS or left by `ray start` or a killed run.
        with _stdin_detached():
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return True


@contextmanager
def _stdin_detached():
    """Start Ray's processes with /dev/null as stdin instead of the driver's terminal.

    Started from a shell, Ray workers share the terminal but are not its foreground job;
    a worker that runs a program touching its stdin (ffmpeg sets terminal modes, and
    PySceneDetect runs `ffmpeg -v quiet` when imported) is stopped by the kernel and the
    run hangs at stage setup."""
    try:
        saved = os.dup(0)
    except OSError:  # no stdin at all: nothing to hide
        yield
        return
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(devnull, 0)
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(devnull)


def _check_fits(recipe: Recipe, stages: list[Stage]) -> None:
    """Pools that cannot all be placed would hang silently; fail with a clear message instead."""
    want = sum(spec.workers * stage.resources.cpus for spec, stage in zip(recipe.stages, stages))
    have = ray.cluster_resources().get("CPU", 0)
    if want > have + 1e-9:
        detail = ", ".join(f"{s.stage}: {s.workers} x {st.resources.cpus}" for s, st in zip(recipe.stages, stages))
        raise RecipeError(f"recipe {recipe.name!r} asks for {want:g} CPUs ({detail}) but the cluster has {have:g}; "
                          "lower 'workers' or 'cpus' per stage")


def _one_line(exc: BaseException) -> str:
    """An exception as one plain line (Ray's messages carry colour codes and tracebacks)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


class _Pool:
    """The actors of one stage. Dead actors leave it and are replaced by fresh ones."""

    def __init__(self, stage: Stage, workers: int, batch_size: int, last: bool, max_item_retries: int):
        res = stage.resources
        self._actor = ray.remote(_StageActor).options(
            num_cpus=res.cpus, num_gpus=res.gpus or None,
            memory=int(res.memory_gb * 2**30) or None, max_restarts=0, max_task_retries=0,
        )
        self.stage = stage
        self.last = last
        self.name = stage.name
        self.batch_size = batch_size
        self.max_item_retries = max_item_retries
        self.starting: dict = {}  # ready() ref -> actor
        self.idle: deque = deque()
        self.busy: set = set()
        self.queue: deque[Item] = deque()
        self.alone: deque[Item] = deque()  # items of a batch whose worker died: retried one at a time
        self.crashes: Counter = Counter()  # (video_id, clip_index) -> deaths while run alone
        self.last_error = ""
        for _ in range(workers):
            self.spawn()

    def spawn(self) -> None:
        actor = self._actor.remote(self.stage, self.last)
        self.starting[actor.ready.remote()] = actor

    def started(self, ref) -> str | None:
        """Handle a finished ready() call; returns the setup error, if any."""
        actor = self.starting.pop(ref)
        try:
            error = ray.get(ref)
        except RayError as exc:
            error = (f"its worker died while setting up ({_one_line(exc)})", "")
        if error is None:
            self.idle.append(actor)
            return None
        ray.kill(actor, no_restart=True)
        message, tb = error
        if tb:
            log.error("stage %s failed to set up:\n%s", self.name, tb)
        self.last_error = message
        return message

    @property
    def has_work(self) -> bool:
        return bool(self.alone or self.queue)

    @property
    def alive(self) -> bool:
        return bool(self.idle or self.busy or self.starting)

    def take(self) -> tuple[object, list[Item]]:
        actor = self.idle.popleft()
        self.busy.add(actor)
        if self.alone:
            return actor, [self.alone.popleft()]
        return actor, [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]

    def returned(self, actor) -> None:
        self.busy.discard(actor)
        self.idle.append(actor)

    def died(self, actor, batch: list[Item], exc: BaseException) -> list[Item]:
        """An actor died running `batch`: replace it, requeue the batch item by item; returns
        the items that have now killed their worker `max_item_retries` times, rejected."""
        self.busy.discard(actor)
        ray.kill(actor, no_restart=True)
        self.last_error = _one_line(exc)
        log.warning("stage %s: a worker died on a batch of %d (%s); starting a new one",
                    self.name, len(batch), self.last_error)
        self.spawn()
        if len(batch) > 1:  # which item killed it is unknown: each goes again on its own
            self.alone.extend(batch)
            return []
        (item,) = batch
        key = (item.video_id, item.clip_index)
        self.crashes[key] += 1
        if self.crashes[key] < self.max_item_retries:
            self.alone.appendleft(item)
            return []
        log.warning("stage %s: %s clip %d killed its worker %d times; rejected", self.name, item.source,
                    item.clip_index, self.crashes[key])
        return [item.drop(self.name, "worker_crashed",
                          f"its worker died {self.crashes[key]} times running it alone: {self.last_error}")]

    def close(self) -> None:
        """Tear down every actor (best effort: idle ones are asked to free their models first)."""
        for actor in self.idle:
            try:
                ray.get(actor.close.remote(), timeout=60)
            except RayError:
                pass
        for actor in [*self.idle, *self.busy, *self.starting.values()]:
            ray.kill(actor, no_restart=True)
        self.idle.clear()
        self.busy.clear()
        self.starting.clear()


def run_ray(recipe: Recipe, items, router: Router, address: str | None = None, num_cpus: int | None = None) -> None:
    started = init_ray(address, num_cpus)
    stages = recipe.build_stages()
    pools: list[_Pool] = []
    try:
        _check_fits(recipe, stages)
        for i, (stage, spec) in enumerate(zip(stages, recipe.stages)):
            pools.append(_Pool(stage, spec.workers, spec.batch_size, last=i == len(stages) - 1,
                               max_item_retries=recipe.max_item_retries))
        _wait_ready(pools)
        _stream(recipe, pools, iter(items), router)
    finally:
        for pool in pools:
            pool.close()
        if started:
            ray.shutdown()


def _wait_ready(pools: list[_Pool]) -> None:
    """Every actor of every pool set up, or the run stops with the first stage's own error."""
    refs = {ref: pool for pool in pools for ref in pool.starting}
    ray.wait(list(refs), num_returns=len(refs))
    for ref, pool in refs.items():
        error = pool.started(ref)
        if error:
            raise setup_failed(pool.name, error)


def _stream(recipe: Recipe, pools: list[_Pool], source, router: Router) -> None:
    running: dict = {}  # run() ref -> (stage index, actor, batch)
    exhausted = False
    while True:
        while not exhausted and router.open_videos < recipe.max_videos_in_flight:
            item = next(source, None)
            if item is None:
                exhausted = True
            else:
                pools[0].queue.extend(router.admit(item))
        for index in reversed(range(len(pools))):  # drain later stages first
            pool = pools[index]
            while pool.idle and pool.has_work:
                actor, batch = pool.take()
                running[actor.run.remote(batch)] = (index, actor, batch)
        starting = {ref: pool for pool in pools for ref in pool.starting}
        if not running and exhausted and not any(pool.has_work for pool in pools):
            return  # replacements still starting are not waited for
        if not running and not starting:
            # nothing can move: no worker to give the waiting items to, or videos lost in flight
            raise RunFailed(f"the run cannot go on: {router.open_videos} videos in flight, "
                            f"{sum(len(p.queue) + len(p.alone) for p in pools)} items waiting, no live worker")
        ready, _ = ray.wait([*running, *starting], num_returns=1)
        for ref in ready:
            if ref in starting:
                pool = starting[ref]
                if pool.started(ref) and not pool.alive:
                    raise RunFailed(f"stage {pool.name!r} has no live worker and cannot start one: "
                                    f"{pool.last_error}")
                continue
            index, actor, batch = running.pop(ref)
            pool = pools[index]
            try:
                out, stats = ray.get(ref)
            except RayTaskError as exc:  # the call failed around the stage (StageWorker catches the stage's own)
                pool.returned(actor)
                out = [i.drop(pool.name, "stage_error", _one_line(exc)) for i in batch]
            except RayError as exc:  # the worker process is gone: infrastructure, not this media
                out = pool.died(actor, batch, exc)
                batch = out  # only the items rejected now are settled; the rest are queued again
            else:
                pool.returned(actor)
                router.stats.stage(pool.name, stats)
            if batch:
                onward = router.done(index, batch, out)
                if index + 1 < len(pools):
                    pools[index + 1].queue.extend(onward)
