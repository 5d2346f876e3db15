"""Curation throughput and memory, side by side in one run on the same inputs.

Prints video-seconds processed per wall-second for: decode-only of every frame
(the floor the pipeline cannot beat), the sequential runner, and the Ray runner
on a local cluster started before timing (its start-up time is printed), all with
the same recipe (default: the bundled default, `lafid180k`); the bytes the Ray
driver received per clip (summaries and output rows: working data stays in the
object store) and the largest each pool grew to; then the memory of the
sequential runner on a 1-minute and a 10-minute video, each in a fresh process:
peak RSS, and how far RSS rises after the first clip is written.

    python benchmarks/curate_throughput.py [--recipe lafid180k] [--videos 8] [--seconds 60] [--cpus 2] [--memory-only | --throughput-only]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import av
import numpy as np

from lafid import media
from lafid.recipe import load_recipe
from lafid.runner import curate

SIZE = (480, 360)


def long_video(path: str, seconds: float, fps: float = 29.97) -> str:
    """Real footage looped to length: carphone, its mirror and two portraits, hard cuts every few seconds."""
    if os.path.exists(path):
        return path
    talk = media.resize(media.carphone_frames(), *SIZE)
    shots = [talk, media.mirror(talk), media.resize(media.still(media.astronaut(), 3.0, fps), *SIZE),
             media.resize(media.still(media.grace_hopper(), 3.0, fps), *SIZE)]
    frames, i = [], 0
    while len(frames) < seconds * fps:
        frames.extend(shots[i % len(shots)])
        i += 1
    return media.write_video(path, frames[: int(seconds * fps)], fps)


def decode_only(paths: list[str]) -> float:
    start = time.perf_counter()
    for p in paths:
        with av.open(p) as c:
            c.streams.video[0].thread_type = "AUTO"
            for frame in c.decode(video=0):
                frame.to_ndarray(format="bgr24")
    return time.perf_counter() - start


def timed_curate(recipe, paths, executor) -> tuple[float, object]:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        stats = curate(recipe, paths, out, executor=executor)
        return time.perf_counter() - start, stats


def start_ray(cpus: int) -> float:
    """Start the local cluster before timing, as on a cluster that is already up; return its start-up time.

    Ray starts its workers at nice 15 (RAY_worker_niceness) so its own services stay responsive; the
    sequential runner runs at the shell's priority. On a machine shared with other work that alone
    decides the comparison, so the benchmark starts Ray's workers at nice 0, as the sequential runner."""
    from lafid.ray_executor import init_ray

    os.environ.setdefault("RAY_worker_niceness", "0")
    start = time.perf_counter()
    init_ray(num_cpus=cpus)
    return time.perf_counter() - start


_MEMORY_PROBE = """
import json, resource, sys, tempfile
import psutil
from lafid.recipe import load_recipe
from lafid.runner import curate
proc, seen = psutil.Process(), {}
def on_update(stats):
    rss = proc.memory_info().rss
    seen.setdefault("first", rss)
    seen["max"] = max(seen.get("max", 0), rss)
with tempfile.TemporaryDirectory() as out:
    curate(load_recipe(sys.argv[2]), [sys.argv[1]], out, executor="sequential", on_update=on_update)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **seen}))
"""


def memory_mb(path: str, recipe: str) -> dict[str, float]:
    """A fresh process curates one video: its peak RSS, and how far RSS rose after the first clip was written
    (models are loaded by then, so that rise is what processing the rest of the video costs)."""
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, recipe], capture_output=True, text=True, check=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
    return {"peak": m["peak"] / 2**20, "growth": (m["max"] - m["first"]) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="lafid180k", help="bundled name or path (default: the default recipe)")
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--long-minutes", type=float, default=10.0)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lafid-bench"))
    ap.add_argument("--memory-only", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--throughput-only", action="store_true", help="skip the memory comparison")
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    figures = {} if args.memory_only else throughput(args)
    if args.throughput_only:
        print(json.dumps({"throughput": figures}))
        return
    short = long_video(os.path.join(args.cache, "one_minute.mp4"), 60)
    long = long_video(os.path.join(args.cache, f"{args.long_minutes:g}_minutes.mp4"), args.long_minutes * 60)
    m1, m10 = memory_mb(short, args.recipe), memory_mb(long, args.recipe)
    print(f"peak RSS, 1-minute video: {m1['peak']:.0f} MB; {args.long_minutes:g}-minute video: {m10['peak']:.0f} MB; "
          f"ratio {m10['peak'] / m1['peak']:.2f}")
    print(f"RSS rise after the first clip: {m1['growth']:.0f} MB (1 min) vs {m10['growth']:.0f} MB ({args.long_minutes:g} min)")
    print(json.dumps({"throughput": figures, "memory_mb": {"1min": m1, f"{args.long_minutes:g}min": m10}}))


def throughput(args) -> dict[str, float]:
    """Video-seconds per wall-second: decode only, sequential runner, Ray runner, on the same inputs."""
    paths = []
    for i in range(args.videos):  # distinct content per video so none is skipped as a duplicate
        path = long_video(os.path.join(args.cache, f"input_{args.seconds:.0f}s_{i}.mp4"), args.seconds + i)
        paths.append(path)
    total_s = sum(args.seconds + i for i in range(args.videos))
    recipe = load_recipe(args.recipe)
    seq_s, seq = timed_curate(recipe, paths, "sequential")
    figures = {"decode_only": total_s / decode_only(paths), "sequential": total_s / seq_s}
    ray_start = start_ray(args.cpus)
    ray_s, par = timed_curate(recipe, paths, "ray")
    figures["ray"] = total_s / ray_s
    from lafid.ray_executor import last_run

    clips = par.kept + par.rejected
    assert (par.kept, par.rejected) == (seq.kept, seq.rejected), "the runners disagree"
    print(f"inputs: {args.videos} videos, {total_s:.0f} s of {SIZE[0]}x{SIZE[1]} footage, recipe {recipe.name!r}, "
          f"{args.cpus} CPUs; {par.kept} clips kept, {par.rejected} rows rejected (both runners)")
    print(f"{'runner':<14}{'video-s / wall-s':>18}")
    for name, rate in figures.items():
        print(f"{name:<14}{rate:>18.2f}")
    print(f"ray / sequential: {figures['ray'] / figures['sequential']:.2f}x  (local Ray start-up, not timed: {ray_start:.1f} s)")
    print(f"driver received {last_run.driver_bytes} bytes from actors: {last_run.driver_bytes / max(1, clips):.0f} "
          f"bytes per clip row (kept and rejected), output rows included; without the output rows "
          f"{(last_run.driver_bytes - last_run.row_bytes) / max(1, clips):.0f} bytes per clip")
    print("pools (largest size, actors given back when idle, CPUs per actor): "
          + ", ".join(f"{k} {last_run.peak_actors[k]}/{last_run.retired.get(k, 0)}/{last_run.requests[k]:g}"
                      for k in last_run.peak_actors))
    busy = sum(st.seconds for st in par.stages.values())
    print(f"Ray actors were busy {busy:.0f} s in {ray_s:.0f} s of wall time: {busy / ray_s:.1f} working at once on "
          f"average (sequential: {sum(st.seconds for st in seq.stages.values()):.0f} s of stage work in {seq_s:.0f} s)")
    figures["ray_actors_busy_at_once"] = busy / ray_s
    figures["driver_bytes_per_clip"] = last_run.driver_bytes / max(1, clips)
    figures["driver_routing_bytes_per_clip"] = (last_run.driver_bytes - last_run.row_bytes) / max(1, clips)
    return figures


if __name__ == "__main__":
    main()
