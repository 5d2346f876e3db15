"""One stage's pool of actors: started, replaced when they die, grown with the queue and given back when idle.

Each actor (`actor.StageActor`) runs the stage through `StageWorker`, exactly as the sequential runner
does, and returns two objects: the items it made (working data stays in Ray's object store) and a small
summary the driver routes on."""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, deque
from dataclasses import replace

import ray
from ray.exceptions import RayError

from lafid.item import Item
from lafid.ray_executor.actor import actor_class, item_key
from lafid.ray_executor.plan import Plan
from lafid.stage import Stage

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
log = logging.getLogger("lafid.run")

# An actor idle this long leaves a pool that is above its minimum. Within a run an idle actor costs nothing: a pool
# whose queue outlasts two starts gets its room at once (`Stream.scale`), so this only hands room back to the
# cluster's other work.
# It outlasts the lulls between a stage's waves of work: at 5 s the face pool gave its second actor back and
# started another 4 s later, 3 times in a 5.6-minute run (1.25 CPU-s per start, benchmarks/curate_throughput.py).
IDLE_S = 30.0
# A pool grows only when its queue would keep its actors busy longer than GROW_AFTER times what starting one
# more took: an actor costs its process, imports and models (0.6-2.0 CPU-s each for the default recipe's stages,
# benchmarks/curate_throughput.py) before it does any work, so a fast
# stage with a momentary queue (shot splitting at the start of a run) drains it sooner with the actors it has.
# 0 grows on any queue (as before). benchmarks/curate_throughput.py compares the two.
GROW_AFTER = 1.0
SETUP_RETRIES = 3  # actors of one stage that may die in a row while setting up before the run stops
CHAIN = "chain"  # the name of a pool whose actors run every stage of the recipe (`pools: chain`)


def one_line(exc: BaseException) -> str:
    """An exception as one plain line (Ray's messages carry colour codes and tracebacks)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


class Pool:
    """The actors of one stage (or of the whole chain of stages, each actor running them all). Dead actors
    leave it and are replaced by fresh ones; the pool grows with its queue and shrinks when idle, within its
    plan."""

    def __init__(self, stages: list[Stage], plan: Plan, batch_size: int, last: bool, max_item_retries: int,
                 native_log: str | None):
        self.name = stages[0].name if len(stages) == 1 else CHAIN
        memory_gb = sum(s.resources.memory_gb for s in stages)
        self._actor = ray.remote(actor_class(self.name)).options(
            num_cpus=plan.cpus, num_gpus=plan.gpus or None,
            memory=int(memory_gb * 2**30) or None, max_restarts=0, max_task_retries=0,
        )
        # Thread pools follow the CPUs an actor holds (`Resources.threads`), not the recipe's request before `auto`
        # scaled it: five actors of a 2-thread stage sharing two cores would fight over them.
        self.stages = [type(s)(s.params, replace(s.resources, cpus=plan.cpus)) for s in stages]
        self.plan = plan
        self.last = last
        self.native_log = native_log
        self.batch_size = batch_size
        self.max_item_retries = max_item_retries
        self.starting: dict = {}  # ready() ref -> actor
        self.asked_at: dict = {}  # ready() ref -> monotonic time the actor was asked for
        self.idle: deque = deque()
        self.idle_since: dict = {}  # actor -> monotonic time it became idle
        self.busy: dict = {}  # actor -> monotonic time its batch was handed out
        self.queue: deque[Item] = deque()
        self.alone: deque[Item] = deque()  # items of a batch whose worker died: retried one at a time
        self.crashes: Counter = Counter()  # (video_id, clip_index) -> deaths while run alone
        self.last_error = ""
        self.failed_stage = self.name  # the stage whose set-up failed (in a chain, one of its stages)
        self.setup_deaths = 0  # actors in a row whose process died while setting up
        self.peak = 0
        self.retired = 0
        self.started_actors = 0  # actors that set up, and what that took: wall seconds and their CPU-seconds
        self.startup_s = 0.0
        self.startup_cpu_s = 0.0
        self.batches = 0  # batches returned, and their wall seconds from hand-out to return
        self.batch_s = 0.0
        for _ in range(plan.low):
            self.spawn()

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.starting)

    def spawn(self) -> None:
        actor = self._actor.remote(self.stages, self.last, self.native_log)
        ref = actor.ready.remote()
        self.starting[ref] = actor
        self.asked_at[ref] = time.monotonic()
        self.peak = max(self.peak, self.size)

    def started(self, ref) -> str | None:
        """Handle a finished ready() call; returns the setup error, if any. An actor whose process
        died while setting up is replaced (SETUP_RETRIES times in a row at most): the machine failed,
        not the stage."""
        actor = self.starting.pop(ref)
        asked = self.asked_at.pop(ref)
        try:
            error, cpu_s = ray.get(ref)
        except RayError as exc:
            ray.kill(actor, no_restart=True)
            self.setup_deaths += 1
            self.last_error = f"its worker died while setting up ({one_line(exc)})"
            if self.setup_deaths <= SETUP_RETRIES:
                log.warning("stage %s: a worker died while setting up (%s); starting a new one (%d of %d)",
                            self.name, one_line(exc), self.setup_deaths, SETUP_RETRIES)
                self.spawn()
                return None
            self.last_error = (f"its worker died while setting up, {self.setup_deaths} time(s) in a row "
                               f"({one_line(exc)})")
            return self.last_error
        if error is None:
            self.setup_deaths = 0
            self.started_actors += 1
            self.startup_s += time.monotonic() - asked
            self.startup_cpu_s += cpu_s
            self._idle(actor)
            return None
        ray.kill(actor, no_restart=True)
        self.failed_stage, message, tb = error
        if tb:
            log.error("stage %s failed to set up:\n%s", self.failed_stage, tb)
        self.last_error = message
        return message

    def _idle(self, actor) -> None:
        self.idle.append(actor)
        self.idle_since[actor] = time.monotonic()

    @property
    def has_work(self) -> bool:
        return bool(self.alone or self.queue)

    @property
    def waiting_batches(self) -> int:
        return len(self.alone) + -(-len(self.queue) // self.batch_size)

    @property
    def alive(self) -> bool:
        return bool(self.idle or self.busy or self.starting)

    def take(self) -> tuple[object, list[Item]]:
        actor = self.idle.pop()  # the most recently idle: the longest idle ones are the first to go
        self.idle_since.pop(actor, None)
        self.busy[actor] = time.monotonic()
        if self.alone:
            return actor, [self.alone.popleft()]
        return actor, [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]

    def returned(self, actor) -> None:
        self.batches += 1
        self.batch_s += time.monotonic() - self.busy.pop(actor)
        self._idle(actor)

    def backlog_s(self, now: float) -> float:
        """Seconds the queue would keep each actor busy: waiting batches times the mean batch's time (before
        any returned, the age of the oldest running one) over the actors."""
        per_batch = self.batch_s / self.batches if self.batches else now - min(self.busy.values(), default=now)
        return self.waiting_batches * per_batch / max(1, self.size)

    def can_grow(self, now: float) -> bool:
        """More batches wait than idle and starting actors could take, the plan allows more, and the queue
        would outlast starting an actor (GROW_AFTER)."""
        if self.waiting_batches <= len(self.idle) + len(self.starting):
            return False
        if self.plan.high is not None and self.size >= self.plan.high:
            return False
        return self.outlasts_starts(now, self)

    def outlasts_starts(self, now: float, *pools: "Pool") -> bool:
        """The queue would keep this pool's actors busy longer than starting one actor of each of `pools` takes
        (GROW_AFTER times their mean start-up)."""
        return self.backlog_s(now) >= GROW_AFTER * sum(p.startup_each_s for p in pools)

    @property
    def startup_each_s(self) -> float:
        """Mean wall seconds from asking for an actor to its stage being set up (0 before any was)."""
        return self.startup_s / self.started_actors if self.started_actors else 0.0

    def can_give(self) -> bool:
        """An idle actor could leave: nothing queued and above the minimum."""
        return not self.has_work and bool(self.idle) and self.size > self.plan.low

    def shrink(self, now: float, idle_s: float | None = None, limit: int | None = None) -> int:
        """Give back (up to `limit`) actors idle for `idle_s` (default IDLE_S) while the pool has no work
        and is above its minimum."""
        idle_s = IDLE_S if idle_s is None else idle_s
        gone = 0
        while (self.can_give() and now - self.idle_since.get(self.idle[0], now) >= idle_s
               and (limit is None or gone < limit)):
            actor = self.idle.popleft()
            self.idle_since.pop(actor, None)
            try:
                ray.get(actor.close.remote(), timeout=30)
            except RayError:
                pass
            ray.kill(actor, no_restart=True)
            gone += 1
        self.retired += gone
        if gone:
            log.info("stage %s: %d idle actor(s) given back, %d left", self.name, gone, self.size)
        return gone

    def died(self, actor, batch: list[Item], exc: BaseException) -> list[Item]:
        """An actor died running `batch`: replace it, requeue the batch item by item; returns
        the items that have now killed their worker `max_item_retries` times, rejected."""
        self.busy.pop(actor, None)
        ray.kill(actor, no_restart=True)
        self.last_error = one_line(exc)
        log.warning("stage %s: a worker died on a batch of %d (%s); starting a new one",
                    self.name, len(batch), self.last_error)
        self.spawn()
        if len(batch) > 1:  # which item killed it is unknown: each goes again on its own
            self.alone.extend(batch)
            return []
        (item,) = batch
        key = item_key(item)
        self.crashes[key] += 1
        if self.crashes[key] < self.max_item_retries:
            self.alone.appendleft(item)
            return []
        what = "the whole video" if item.clip_index < 0 else f"clip {item.clip_index}"
        log.warning("stage %s: %s (%s) killed its worker %d times; rejected", self.name, item.source, what,
                    self.crashes[key])
        return [item.drop(self.name, "worker_crashed",
                          f"its worker died {self.crashes[key]} times running it alone: {self.last_error}")]

    def forget(self, video_id: str) -> None:
        """Drop every waiting item of a video that goes back to the first stage."""
        self.queue = deque(i for i in self.queue if i.video_id != video_id)
        self.alone = deque(i for i in self.alone if i.video_id != video_id)

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
        self.asked_at.clear()
