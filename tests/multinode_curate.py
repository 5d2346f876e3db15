"""Run `lafid curate --address` against a 3-node local Ray cluster and remove a worker node mid-run.

The head holds no CPU (as on a production cluster, work runs on worker nodes): each
worker node has one. The cluster runs with token authentication (a fresh token, in the
environment only, as KubeRay hands it to every pod) on loopback; the run gets the token
from RAY_AUTH_TOKEN, and the report says what the GCS answers a client without it.

Started by tests/test_runtime.py in its own process, so its cluster never meets the
session's Ray. Usage: python multinode_curate.py RECIPE OUT INPUT... ; prints one JSON line.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lafid beside these tests, not another install
# Before ray is imported: Ray reads these once. A one-machine cluster (as on macOS) keeps every node on 127.0.0.1.
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
                  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from lafid.ray_executor import gcs_status  # noqa: E402
from lafid.shards import MANIFEST  # noqa: E402

LAUNCH = """
import sys
sys.path.insert(0, {tests!r})
import runtime_stages
runtime_stages.register()
from lafid.cli import app
app(sys.argv[1:], prog_name="lafid")
"""


def done_videos(out: Path) -> int:
    path = out / MANIFEST
    return sum(len(json.loads(line)["videos"]) for line in path.read_text().splitlines()) if path.exists() else 0


def main() -> None:
    recipe, out, inputs = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    address, without_token = cluster.address, gcs_status(cluster.address)
    launcher = [sys.executable, "-c", LAUNCH.format(tests=str(Path(__file__).parent)), "curate", *inputs,
                "--out", str(out), "--recipe", recipe, "--address", cluster.address, "--no-progress"]
    run = subprocess.Popen(launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    removed = None
    deadline = time.monotonic() + 400
    while run.poll() is None and time.monotonic() < deadline:
        if removed is None and done_videos(out) >= 1:
            # the worker node holding most of the run's actors leaves the cluster
            from ray._private.state import actors  # from the GCS: this cluster runs no dashboard

            stages = {s["stage"] for s in json.loads(Path(recipe).read_text())["stages"]} | {"chain"}  # actor classes
            alive = [a["Address"].get("NodeID") for a in actors().values()
                     if a["State"] == "ALIVE" and a["ActorClassName"].split(".")[-1] in stages]
            by_node = {w.node_id: alive.count(w.node_id) for w in workers}
            victim = max(workers, key=lambda w: by_node[w.node_id])
            cluster.remove_node(victim)
            removed = {"actors_on_node": by_node[victim.node_id], "videos_done_before": done_videos(out)}
        time.sleep(0.2)
    if run.poll() is None:
        run.kill()
    output = run.communicate()[0]
    ray.shutdown()
    cluster.shutdown()
    print(json.dumps({"rc": run.returncode, "removed": removed, "without_token": without_token,
                      "address": address, "output": output[-3000:]}))


if __name__ == "__main__":
    main()
