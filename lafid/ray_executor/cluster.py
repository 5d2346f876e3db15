"""Starting or joining Ray: a local cluster of our own on loopback, closed by a token made for the run,
or a cluster the user runs, joined with their token. A refusal is one line, not Ray's retries."""

from __future__ import annotations

import os
import re
import secrets
from contextlib import contextmanager

import ray
from ray._raylet import AuthenticationTokenLoader, Config
from ray.exceptions import AuthenticationError

from lafid.native import NATIVE_QUIET_ENV
from lafid.router import SetupFailed

_QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}
# A local cluster's settings (each unless the user set RAY_<name>): Ray starts one idle worker per CPU for
# the first driver, but an actor needs a worker with the run's runtime_env, so those never host one and only
# tick (~0.3 CPU-s each to start, then ~0.005 CPU-s a second; docs/runtime.md).
_LOCAL_CONFIG = {"prestart_worker_first_driver": False}
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_outer_auth: dict[str, str | None] | None = None  # Ray's auth variables as they were before a local run's token
_TOKEN_FIX = "set RAY_AUTH_TOKEN or pass --ray-token-file with the cluster's token"
# Native libraries' own logging (NATIVE_QUIET_ENV: mediapipe/TFLite glog, TensorFlow) is turned down in workers,
# and what they still write to stderr goes to NATIVE_LOG (see actor.StageActor), never to the terminal.
# libav's own logging is left to libav: routing it through PyAV's Python callback deadlocks threaded decoding.


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
            ray.init(address="local", num_cpus=num_cpus, _system_config=_local_config(), **kwargs)
    except BaseException:
        shutdown_ray()
        raise


def _local_config() -> dict:
    """`_LOCAL_CONFIG` less what the user set in the environment (Ray's own RAY_<name> variables)."""
    return {k: v for k, v in _LOCAL_CONFIG.items() if f"RAY_{k}" not in os.environ}


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
