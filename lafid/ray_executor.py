"""The Ray executor: one autoscaling actor pool per stage, streamed with a bounded window.

This is the only module that imports ray. Each stage runs in its own pool of
actors (`workers`: a fixed number, `auto`, or `{min, max}`); a pool starts at its
minimum, grows while more batches wait than its actors can take and the cluster has room,
and gives back an actor that has been idle for `IDLE_S` seconds. `auto` pools ask
for a share of a CPU scaled to the cluster (see `_plan`), so the same recipe fits a
2-core laptop and fills a large cluster. The driver keeps at most
`max_videos_in_flight` videos between source and writer, so memory stays flat
however long the input list is. Where items go is decided by `lafid.router`.

Data stays in the object store: an actor returns two objects, the items it made
(decoded faces, audio: they stay where they were made, in Ray's object store) and a
small summary (per item: its key, its reject if any, and its output row only when it
goes to the writer). The driver routes on summaries and hands the next pool the
*reference* to the previous pool's items; the next actor picks its items out of it.

Failures of the machinery are not failures of the media:
- every actor must report its stage set up before any work is handed out; a
  stage whose `setup()` raises stops the run with its own error, while an actor
  whose process dies while setting up (OOM killer, lost node) is replaced, up to
  `SETUP_RETRIES` times in a row per stage;
- an actor that dies leaves its pool and a fresh one is started in its place;
  its batch is retried, each item alone, and only an item that kills its worker
  `max_item_retries` times on its own becomes a `worker_crashed` reject;
- working data lost with a node (an object that cannot be fetched) sends the
  videos it belonged to back to the first stage; nothing is recorded for them
  until they come through again;
- a pool left with no live actor that cannot start a new one fails the run.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import secrets
import tempfile
import time
import traceback
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray
from ray._raylet import AuthenticationTokenLoader, Config
from ray.exceptions import AuthenticationError, ObjectLostError, RayError, RayTaskError

from lafid.item import Item
from lafid.native import NATIVE_LOG, NATIVE_QUIET_ENV, stderr_to
from lafid.recipe import Recipe, RecipeError
from lafid.router import Router, RunFailed, SetupFailed, setup_failed
from lafid.stage import Stage, StageWorker

_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_outer_auth: dict[str, str | None] | None = None  # Ray's auth variables as they were before a local run's token
_TOKEN_FIX = "set RAY_AUTH_TOKEN or pass --ray-token-file with the cluster's token"
# Native libraries' own logging (NATIVE_QUIET_ENV: mediapipe/TFLite glog, TensorFlow) is turned down in workers,
# and what they still write to stderr goes to NATIVE_LOG (see _StageActor), never to the terminal.
# libav's own logging is left to libav: routing it through PyAV's Python callback deadlocks threaded decoding.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
log = logging.getLogger("lafid.run")

IDLE_S = 5.0  # an actor idle this long leaves a pool that is above its minimum
# `auto` pools: CPU requests are scaled down only as far as one actor per auto stage plus one SPARE actor of
# the largest fit. More actors than CPUs do not run faster, and each costs ~2.5 CPU-s to start
# (benchmarks/curate_throughput.py, 2 CPUs: room for 2x as many actors started 13 and took 105 CPU-s for the
# 62 CPU-s of stage work; 1x started 4: 68-88 CPU-s). Without the spare, a stage that dominates (speech on
# talking footage) keeps one actor, and one of two cores, while the other stages' actors sit idle.
SPARE = 1
TICK_S = 0.5  # how often the driver looks at queues and free resources
SETUP_RETRIES = 3  # actors of one stage that may die in a row while setting up before the run stops


@dataclass
class RunInfo:
    """What the last Ray run did, for benchmarks and the run's log."""

    driver_bytes: int = 0  # bytes of summaries the driver received from actors
    row_bytes: int = 0  # of which output rows (columns of items going to the writer)
    summaries: int = 0
    items: int = 0  # items the summaries described
    restarted_videos: int = 0  # videos sent back to the first stage after their data was lost
    peak_actors: dict[str, int] = field(default_factory=dict)
    retired: dict[str, int] = field(default_factory=dict)  # actors given back for being idle, per stage
    requests: dict[str, float] = field(default_factory=dict)  # CPUs per actor, as asked of Ray
    sizes: list[tuple[float, dict[str, int]]] = field(default_factory=list)  # (seconds into the run, actors per pool)


last_run = RunInfo()


def _key(item: Item) -> tuple[str, int]:
    return item.video_id, item.clip_index


def _stub(item: Item, full: bool) -> Item:
    """What the driver needs of an item: its key and reject, and its output row only if `full`."""
    return Item(source=item.source, video_id=item.video_id, clip_index=item.clip_index,
                clip_count=item.clip_count, start_s=item.start_s, end_s=item.end_s,
                columns=dict(item.columns) if full else {}, reject=item.reject)


class _StageActor:
    def __init__(self, stage: Stage, last: bool, native_log: str | None = None):
        self.worker: StageWorker | None = None
        self.error: tuple[str, str] | None = None
        if native_log:
            try:
                stderr_to(native_log)
            except OSError:  # the output folder is not on this node: the node's temp folder
                stderr_to(os.path.join(tempfile.gettempdir(), "lafid", NATIVE_LOG))
        try:
            self.worker = StageWorker(stage, last)
        except Exception as exc:  # reported by ready(): the driver fails the run with it
            self.error = (f"{type(exc).__name__}: {exc}", traceback.format_exc())

    def ready(self) -> tuple[str, str] | None:
        """None once the stage is set up; otherwise (error, traceback)."""
        return self.error

    def run(self, direct: list[Item], picks: list[list[tuple[str, int]]], *parts: list[Item]):
        """Run the stage on `direct` items plus, from each earlier pool's output `parts[i]`, the items
        keyed `picks[i]`. Returns (the items, for the next pool; a small summary, for the driver)."""
        items = list(direct)
        for keys, part in zip(picks, parts):
            wanted = set(keys)
            items.extend(i for i in part if _key(i) in wanted)
        out, stats = self.worker.run(items)
        full = self.worker.last
        return out, (stats, [_stub(i, full or i.rejected) for i in out])

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def _named(stage: str) -> type:
    """`_StageActor` under the stage's name: Ray titles an actor's process by its class (`ray::shot_split`
    in `ps`, `ray::shot_split.run` while it works)."""
    return type(stage, (_StageActor,), {"__module__": __name__, "__qualname__": stage})


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Start (or join) Ray; True if this call started it and must end it with `shutdown_ray`."""
    if ray.is_initialized():
        return False
    os.environ.update(_QUIET_ENV)
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False,
                  runtime_env={"env_vars": {**_QUIET_ENV, **NATIVE_QUIET_ENV}})
    if address:
        _join(address, kwargs)
    else:
        _start_local(num_cpus, kwargs)
    return True


def shutdown_ray() -> None:
    """Stop (or leave) Ray; a local run's token leaves the environment with its cluster."""
    global _outer_auth
    ray.shutdown()
    if _outer_auth is not None:
        _set_auth(**_outer_auth)
        _outer_auth = None


def _start_local(num_cpus: int | None, kwargs: dict) -> None:
    """A new cluster of our own ("local": never one named by RAY_ADDRESS or left by `ray start` or a
    killed run), closed by a random token made for this run, its services on loopback only.

    The token is in this process's environment only, which Ray's processes inherit; nothing is
    written to ~/.ray. The caller's own auth variables come back with `shutdown_ray`."""
    global _outer_auth
    _outer_auth = {k: os.environ.get(k) for k in _AUTH_ENV}
    _set_auth(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_AUTH_TOKEN_PATH=None)
    try:
        with _stdin_detached(), _loopback_node():
            ray.init(address="local", num_cpus=num_cpus, **kwargs)
    except BaseException:
        shutdown_ray()
        raise


def _join(address: str, kwargs: dict) -> None:
    """Join a cluster with the user's token (RAY_AUTH_TOKEN, or the file named by RAY_AUTH_TOKEN_PATH,
    which --ray-token-file sets); a token given turns Ray's token mode on. A refusal is one line."""
    if not os.environ.get("RAY_AUTH_MODE") and (os.environ.get("RAY_AUTH_TOKEN") or
                                                 os.environ.get("RAY_AUTH_TOKEN_PATH")):
        _set_auth(RAY_AUTH_MODE="token")
    try:
        header = AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=False)
    except AuthenticationError:
        raise SetupFailed(f"cannot join the Ray cluster at {address}: RAY_AUTH_MODE is token and no token "
                          f"was found; {_TOKEN_FIX}") from None
    token = header.get("authorization", "").removeprefix("Bearer ") or None
    # host:port: asked once now, not after Ray's 20 connection attempts (each logged); "auto" and ray:// are Ray's
    if re.fullmatch(r"[\w.-]+:\d+", address) and gcs_status(address, token) == "UNAUTHENTICATED":
        raise _refusal(address)
    try:
        ray.init(address=address, **kwargs)
    except (AuthenticationError, ConnectionError, RuntimeError) as exc:
        if not _refused(exc):
            raise
        raise _refusal(address) from None


def gcs_status(address: str, token: str | None = None) -> str:
    """What the GCS at `address` (host:port) answers one call carrying `token` (None: no token): "OK",
    or the gRPC status ("UNAUTHENTICATED": refused, "UNAVAILABLE": nothing there)."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=5)
        except grpc.RpcError as exc:
            return exc.code().name
    return "OK"


def _set_auth(**env: str | None) -> None:
    """Set (None: remove) Ray's auth variables and have this process's Ray read them again:
    it read them when it was imported, and keeps the token it loaded."""
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _refused(exc: BaseException | None) -> bool:
    """Ray gave up on a cluster because of its token (Ray wraps the refusal in connection errors)."""
    while exc is not None:
        if isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _refusal(address: str) -> SetupFailed:
    """The cluster refused this process's token: which token it was, and what to do."""
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    if mode.lower() != "token":
        why = f"it asks for a token and RAY_AUTH_MODE is {mode}"
    elif os.environ.get("RAY_AUTH_TOKEN"):
        why = "the token in RAY_AUTH_TOKEN is not the cluster's"
    else:
        why = f"the token in {os.environ.get('RAY_AUTH_TOKEN_PATH') or '~/.ray/auth_token'} is not the cluster's"
    return SetupFailed(f"the Ray cluster at {address} refused the connection: {why}; {_TOKEN_FIX}")


@contextmanager
def _loopback_node():
    """Ray replaces a loopback node address with the machine's own (its services then listen on
    every interface) unless it runs as a one-machine cluster, its default on macOS and Windows.
    One while the local cluster starts: every service binds 127.0.0.1."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


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


@dataclass
class _Plan:
    """How one stage's pool is sized: actors (min, max) and what each asks of Ray."""

    low: int
    high: int | None
    cpus: float
    gpus: float


def _plan(recipe: Recipe, stages: list[Stage]) -> list[_Plan]:
    """Size every pool from the cluster, or fail now when a request can never fit.

    Fixed and {min, max} pools ask for what the recipe says, and their minimum must fit. `auto` pools
    start at one actor; their CPU request is the stage's, scaled down (fractional CPUs) when the
    cluster cannot hold one actor of every auto stage and SPARE more of the largest beside the fixed
    minimums (so the slowest stage can grow by one), and never above the largest node."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    node_cpus = max((n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=cpus)
    specs = list(zip(recipe.stages, stages))
    fixed = sum(spec.worker_range[0] * st.resources.cpus for spec, st in specs if spec.workers != "auto")
    auto_cpus = [st.resources.cpus for spec, st in specs if spec.workers == "auto"]
    auto = sum(auto_cpus) + SPARE * max(auto_cpus, default=0.0)
    room = cpus - fixed
    scale = 1.0 if auto == 0 else min(1.0, room / auto)
    if fixed > cpus + 1e-9 or (auto and scale <= 0.01):
        detail = ", ".join(f"{s.stage}: {s.workers if s.workers != 'auto' else 'auto (at least 1)'} x "
                           f"{st.resources.cpus:g}" for s, st in specs)
        raise RecipeError(f"recipe {recipe.name!r} asks for {fixed:g} CPUs ({detail}) but the cluster has "
                          f"{cpus:g}; lower 'workers' or 'cpus' per stage, or use workers: auto")
    plans = []
    for spec, st in specs:
        low, high = spec.worker_range
        want_gpus = st.resources.gpus
        if want_gpus and low * want_gpus > gpus + 1e-9:
            raise RecipeError(f"recipe {recipe.name!r}: stage {spec.stage!r} asks for {low} x {want_gpus:g} GPUs "
                              f"but the cluster has {gpus:g}")
        per = st.resources.cpus
        if spec.workers == "auto":
            per = round(max(0.01, min(per * scale, node_cpus)), 4)
        elif per > node_cpus + 1e-9:
            raise RecipeError(f"recipe {recipe.name!r}: stage {spec.stage!r} asks for {per:g} CPUs per actor but "
                              f"the largest node has {node_cpus:g}")
        plans.append(_Plan(low, high, per, want_gpus))
    return plans


def _one_line(exc: BaseException) -> str:
    """An exception as one plain line (Ray's messages carry colour codes and tracebacks)."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _lost_data(exc: BaseException) -> bool:
    """The call failed because an object it needed was lost (with a node), not because of its worker."""
    return isinstance(exc, ObjectLostError) or isinstance(getattr(exc, "cause", None), ObjectLostError)


class _Pool:
    """The actors of one stage. Dead actors leave it and are replaced by fresh ones; the pool grows
    with its queue and shrinks when idle, within its plan."""

    def __init__(self, stage: Stage, plan: _Plan, batch_size: int, last: bool, max_item_retries: int,
                 native_log: str | None):
        res = stage.resources
        self._actor = ray.remote(_named(stage.name)).options(
            num_cpus=plan.cpus, num_gpus=plan.gpus or None,
            memory=int(res.memory_gb * 2**30) or None, max_restarts=0, max_task_retries=0,
        )
        self.stage = stage
        self.plan = plan
        self.last = last
        self.native_log = native_log
        self.name = stage.name
        self.batch_size = batch_size
        self.max_item_retries = max_item_retries
        self.starting: dict = {}  # ready() ref -> actor
        self.idle: deque = deque()
        self.idle_since: dict = {}  # actor -> monotonic time it became idle
        self.busy: set = set()
        self.queue: deque[Item] = deque()
        self.alone: deque[Item] = deque()  # items of a batch whose worker died: retried one at a time
        self.crashes: Counter = Counter()  # (video_id, clip_index) -> deaths while run alone
        self.last_error = ""
        self.setup_deaths = 0  # actors in a row whose process died while setting up
        self.peak = 0
        self.retired = 0
        for _ in range(plan.low):
            self.spawn()

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.starting)

    def spawn(self) -> None:
        actor = self._actor.remote(self.stage, self.last, self.native_log)
        self.starting[actor.ready.remote()] = actor
        self.peak = max(self.peak, self.size)

    def started(self, ref) -> str | None:
        """Handle a finished ready() call; returns the setup error, if any. An actor whose process
        died while setting up is replaced (SETUP_RETRIES times in a row at most): the machine failed,
        not the stage."""
        actor = self.starting.pop(ref)
        try:
            error = ray.get(ref)
        except RayError as exc:
            ray.kill(actor, no_restart=True)
            self.setup_deaths += 1
            self.last_error = f"its worker died while setting up ({_one_line(exc)})"
            if self.setup_deaths <= SETUP_RETRIES:
                log.warning("stage %s: a worker died while setting up (%s); starting a new one (%d of %d)",
                            self.name, _one_line(exc), self.setup_deaths, SETUP_RETRIES)
                self.spawn()
                return None
            self.last_error = (f"its worker died while setting up, {self.setup_deaths} time(s) in a row "
                               f"({_one_line(exc)})")
            return self.last_error
        if error is None:
            self.setup_deaths = 0
            self._idle(actor)
            return None
        ray.kill(actor, no_restart=True)
        message, tb = error
        if tb:
            log.error("stage %s failed to set up:\n%s", self.name, tb)
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
        self.busy.add(actor)
        if self.alone:
            return actor, [self.alone.popleft()]
        return actor, [self.queue.popleft() for _ in range(min(self.batch_size, len(self.queue)))]

    def returned(self, actor) -> None:
        self.busy.discard(actor)
        self._idle(actor)

    def can_grow(self) -> bool:
        """More batches wait than idle and starting actors could take, and the plan allows more."""
        return (self.waiting_batches > len(self.idle) + len(self.starting)
                and (self.plan.high is None or self.size < self.plan.high))

    def can_give(self) -> bool:
        """An idle actor could leave: nothing queued and above the minimum."""
        return not self.has_work and bool(self.idle) and self.size > self.plan.low

    def shrink(self, now: float, idle_s: float = IDLE_S, limit: int | None = None) -> int:
        """Give back (up to `limit`) actors idle for `idle_s` while the pool has no work and is above
        its minimum."""
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
        key = _key(item)
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


def run_ray(recipe: Recipe, items, router: Router, address: str | None = None, num_cpus: int | None = None) -> None:
    global last_run
    last_run = RunInfo()
    started = init_ray(address, num_cpus)
    stages = recipe.build_stages()
    pools: list[_Pool] = []
    native = router.stats.native_log  # the run's own log (lafid.runner), which workers append to
    try:
        plans = _plan(recipe, stages)
        for i, (stage, spec, plan) in enumerate(zip(stages, recipe.stages, plans)):
            pools.append(_Pool(stage, plan, spec.batch_size, last=i == len(stages) - 1,
                               max_item_retries=recipe.max_item_retries, native_log=native))
            last_run.requests[stage.name] = plan.cpus
        log.info("pools: %s", ", ".join(f"{p.name} {p.plan.low}..{p.plan.high or 'fit'} x {p.plan.cpus:g} CPU"
                                         for p in pools))
        _wait_ready(pools)
        _Stream(recipe, pools, router).run(iter(items))
    finally:
        for pool in pools:
            last_run.peak_actors[pool.name] = pool.peak
            last_run.retired[pool.name] = pool.retired
            pool.close()
        if started:
            shutdown_ray()
        if last_run.items:
            log.info("driver received %d bytes of summaries for %d items (%d bytes per item)", last_run.driver_bytes,
                     last_run.items, last_run.driver_bytes // max(1, last_run.items))


def _wait_ready(pools: list[_Pool]) -> None:
    """Every actor of every pool set up (replacements of those that died included), or the run stops
    with the first stage's own error."""
    refs = {ref: pool for pool in pools for ref in pool.starting}
    while refs:
        ray.wait(list(refs), num_returns=len(refs))
        for ref, pool in refs.items():
            error = pool.started(ref)
            if error:
                raise setup_failed(pool.name, error)
        refs = {ref: pool for pool in pools for ref in pool.starting}


class _Stream:
    """The driver loop: admit videos, hand batches (object references) to pools, route summaries."""

    def __init__(self, recipe: Recipe, pools: list[_Pool], router: Router):
        self.recipe = recipe
        self.pools = pools
        self.router = router
        self.where: dict[tuple[str, int], object] = {}  # item key -> ref of the pool output holding it
        self.epoch: Counter = Counter()  # video -> times it went back to the first stage
        self.running: dict = {}  # summary ref -> (stage index, actor, batch, items ref, epochs)
        self.next_tick = 0.0
        self.started = time.monotonic()

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
                while pool.idle and pool.has_work:
                    self.submit(index, *pool.take())
            self.scale()
            starting = {ref: pool for pool in pools for ref in pool.starting}
            if not self.running and exhausted and not any(pool.has_work for pool in pools):
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

    def submit(self, index: int, actor, batch: list[Item]) -> None:
        direct, picks, parts, where = [], [], [], {}
        for item in batch:
            ref = self.where.get(_key(item))
            if ref is None:
                direct.append(item)
                continue
            if ref not in where:
                where[ref] = len(parts)
                parts.append(ref)
                picks.append([])
            picks[where[ref]].append(_key(item))
        items_ref, summary_ref = actor.run.options(num_returns=2).remote(direct, picks, *parts)
        epochs = {i.video_id: self.epoch[i.video_id] for i in batch}
        self.running[summary_ref] = (index, actor, batch, items_ref, epochs)

    def finished(self, ref) -> None:
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
                out = [i.drop(pool.name, "stage_error", _one_line(exc)) for i in batch]
            else:  # the worker process is gone: infrastructure, not this media
                out = pool.died(actor, batch, exc)
                batch = out  # only the items rejected now are settled; the rest are queued again
        else:
            pool.returned(actor)
            self.router.stats.stage(pool.name, stats)
            last_run.driver_bytes += len(pickle.dumps((stats, out), protocol=5))
            last_run.row_bytes += sum(len(pickle.dumps(i.columns, protocol=5)) for i in out if i.columns)
            last_run.summaries += 1
            last_run.items += len(out)
        stale = {v for v, e in epochs.items() if self.epoch[v] != e}
        if stale:  # videos sent back to the first stage while this batch ran: its results are void
            batch = [i for i in batch if i.video_id not in stale]
            out = [i for i in out if i.video_id not in stale]
        if not batch:
            return
        for item in batch:
            self.where.pop(_key(item), None)
        onward = self.router.done(index, batch, out)
        if index + 1 < len(self.pools):
            for item in onward:
                self.where[_key(item)] = items_ref
            self.pools[index + 1].queue.extend(onward)

    def restart(self, batch: list[Item], exc: BaseException) -> None:
        """The working data of `batch` was lost (its node left the cluster): every video in it goes
        back to the first stage; their rows are written only when they come through again."""
        videos = {i.video_id: i.source for i in batch}
        log.warning("working data of %d video(s) was lost (%s); they start again", len(videos), _one_line(exc))
        for video_id, source in videos.items():
            if not self.router.is_open(video_id):
                continue
            self.epoch[video_id] += 1
            for pool in self.pools:
                pool.forget(video_id)
            for key in [k for k in self.where if k[0] == video_id]:
                del self.where[key]
            self.pools[0].queue.extend(self.router.restart(video_id, source))
            last_run.restarted_videos += 1

    def scale(self) -> None:
        """Grow pools with more batches waiting than actors to take them (one actor per pool per tick,
        the longest queue per actor first, while the cluster has room) and give back actors idle for
        IDLE_S."""
        now = time.monotonic()
        if now < self.next_tick:
            return
        self.next_tick = now + TICK_S
        sizes = {p.name: p.size for p in self.pools}
        if not last_run.sizes or last_run.sizes[-1][1] != sizes:  # a step function: changes only
            last_run.sizes.append((now - self.started, sizes))
        for pool in self.pools:
            pool.shrink(now, IDLE_S)
        growing = sorted((p for p in self.pools if p.can_grow()), key=lambda p: -p.waiting_batches / max(1, p.size))
        if not growing:
            return
        free = ray.available_resources()
        cpu, gpu = free.get("CPU", 0.0), free.get("GPU", 0.0)
        for pool in self.pools:  # actors asked for but not yet placed hold nothing yet: count them as taken
            cpu -= pool.plan.cpus * len(pool.starting)
            gpu -= pool.plan.gpus * len(pool.starting)
        for pool in growing:  # one actor per pool per tick: actors take seconds to start
            if pool.plan.cpus <= cpu + 1e-9 and pool.plan.gpus <= gpu + 1e-9:
                pool.spawn()
                log.info("stage %s: %d batches wait, starting actor %d", pool.name, pool.waiting_batches, pool.size)
                cpu -= pool.plan.cpus
                gpu -= pool.plan.gpus
                continue
            # no room: an idle actor of a pool with nothing queued leaves now, not after IDLE_S
            donor = next((p for p in self.pools if p is not pool and p.can_give()), None)
            if donor is not None:
                donor.shrink(now, idle_s=0.0, limit=1)
