"""Ray's services during a run: on loopback, closed to clients without the run's token, nothing
written under ~/.ray; `--address` passes the user's token and a refusal is one line."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lafid.ray_executor import gcs_status

from conftest import manifest_videos

REPO = Path(__file__).resolve().parents[1]
LAUNCH = """
import sys
sys.path.insert(0, {tests!r})
import runtime_stages
runtime_stages.register()
from lafid.cli import app
app(sys.argv[1:], prog_name="lafid")
"""


def carry_yaml(tmp_path: Path, delay_s: float, pid_dir: str = "") -> str:
    recipe = {"name": "carry", "stages": [
        {"stage": "shot_split", "cpus": 0.25, "params": {"min_clip_s": 0.5}},
        {"stage": "carry", "workers": 1, "params": {"megabytes": 0.1}},
        {"stage": "weigh", "workers": 1, "params": {"delay_s": delay_s, "pid_dir": pid_dir}}]}
    path = tmp_path / "carry.yaml"  # checked where the test stages are registered: in the run
    path.write_text(json.dumps(recipe))
    return str(path)


def launch(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`lafid ARGS` from this worktree, with the test stages registered."""
    code = LAUNCH.format(tests=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env={**env, "RAY_ADDRESS": ""},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket the processes listen on."""
    found = []
    for proc in procs:
        try:
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return found


def loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_local_run_listens_on_loopback_and_refuses_clients_without_its_token(distinct_videos, tmp_path):
    """While `lafid curate` runs (its last stage set up, clips still to do): every socket of the run's
    processes listens on loopback, its GCS refuses a client with no token or a wrong one and answers
    one with the run's token (the control). The run's HOME gets no ~/.ray. Started with
    RAY_AUTH_MODE=disabled in its environment, as an old image set it: the run turns token auth on."""
    home, pids, out = tmp_path / "home", tmp_path / "pids", tmp_path / "out"
    home.mkdir()
    pids.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN", None)
    run = launch(["curate", *distinct_videos[:2], "--out", str(out), "--recipe", carry_yaml(tmp_path, 2.0, str(pids)),
                  "--no-progress", "--num-cpus", "2"], env)
    try:
        deadline = time.monotonic() + 200
        while not any(pids.iterdir()) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, run.communicate()[0][-3000:]
        tree = [psutil.Process(run.pid), *psutil.Process(run.pid).children(recursive=True)]
        (gcs,) = [p for p in tree if p.name() == "gcs_server"]
        sockets = listening(tree)
        token = gcs.environ()["RAY_AUTH_TOKEN"]  # Ray's processes inherit it: only the user's processes can read it
        (gcs_port,) = {port for name, _, port in sockets if name == "gcs_server"}
        address = f"127.0.0.1:{gcs_port}"
        answers = {"none": gcs_status(address), "wrong": gcs_status(address, "0" * 64),
                   "run's": gcs_status(address, token)}
        still_running = run.poll() is None
    finally:
        output = run.communicate(timeout=200)[0]
    print("listening:", sorted(sockets), "\nGCS answers:", answers)
    assert still_running  # the probes ran while the run was in progress
    assert len({name for name, _, _ in sockets}) >= 4 and all(loopback(ip) for _, ip, _ in sockets), sockets
    assert answers == {"none": "UNAUTHENTICATED", "wrong": "UNAUTHENTICATED", "run's": "OK"}
    assert run.returncode == 0, output[-3000:]
    assert not (home / ".ray").exists()
    assert not any(token in p.read_text(errors="replace") for p in out.rglob("*") if p.is_file())


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_an_address_run_passes_the_users_token_and_a_refusal_is_one_line(ray_cluster, distinct_videos, tmp_path):
    """`lafid curate --address` to a token-protected cluster (the session's): a wrong token file ends
    in one line and exit 2, at once; the cluster's own token, from a file (newline and all) or from
    RAY_AUTH_TOKEN, runs (the controls)."""
    address = ray_cluster.get_runtime_context().gcs_address
    # the session cluster is on loopback: a client must not turn 127.0.0.1 into the machine's address
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    token = env.pop("RAY_AUTH_TOKEN")
    env.pop("RAY_AUTH_MODE")
    wrong, right = tmp_path / "wrong.token", tmp_path / "right.token"
    wrong.write_text("0" * 64)
    right.write_text(token + "\n")
    recipe = carry_yaml(tmp_path, 0.0)

    def curate(name: str, *args: str, **extra: str) -> tuple[int, str]:
        run = launch(["curate", distinct_videos[0], "--out", str(tmp_path / name), "--recipe", recipe,
                      "--no-progress", "--address", address, *args], {**env, **extra})
        return run.returncode if run.wait(timeout=200) is not None else -1, run.communicate()[0]

    rc, output = curate("wrong", "--ray-token-file", str(wrong), RAY_AUTH_TOKEN=token)  # the file wins
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    print(output[-2000:])
    assert rc == 2 and len(errors) == 1, output[-3000:]
    assert f"the Ray cluster at {address} refused the connection: the token in {wrong}" in errors[0]
    assert "Traceback" not in output and "Failed to get cluster ID" not in output  # asked once, not Ray's 20 tries
    rc, output = curate("none")
    assert rc == 2 and "it asks for a token and RAY_AUTH_MODE is unset" in output, output[-3000:]
    rc, output = curate("file", "--ray-token-file", str(right))
    assert rc == 0, output[-3000:]
    rc, output = curate("env", RAY_AUTH_TOKEN=token)
    assert rc == 0, output[-3000:]
    assert manifest_videos(tmp_path / "file") == manifest_videos(tmp_path / "env") and \
        len(manifest_videos(tmp_path / "env")) == 1


def test_a_token_file_is_checked_before_ray_starts(tmp_path):
    """Ray aborts the process on a token file it cannot read: the command says what is wrong first."""
    from typer.testing import CliRunner

    from lafid.cli import app

    empty, token = tmp_path / "empty.token", tmp_path / "ok.token"
    empty.write_text("\n")
    token.write_text("0" * 64)
    for args, message in (([str(token)], "--ray-token-file is for --address; a local run makes its own token"),
                          ([str(tmp_path / "missing"), "--address", "127.0.0.1:1"], "cannot read --ray-token-file"),
                          ([str(empty), "--address", "127.0.0.1:1"], "is empty")):
        result = CliRunner().invoke(app, ["curate", str(tmp_path), "--out", str(tmp_path / "out"),
                                          "--ray-token-file", *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()
