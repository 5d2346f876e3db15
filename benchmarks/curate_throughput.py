"""Curation throughput and memory, side by side in one run on the same inputs.

Prints video-seconds processed per wall-second for: decode-only of every frame
(the floor the pipeline cannot beat), the sequential runner, and the Ray runner
on a local cluster started before timing (its start-up time is printed); then the peak memory (max RSS) of the sequential runner on a
1-minute and a 10-minute video, each in a fresh process.

    python benchmarks/curate_throughput.py [--videos 4] [--seconds 60] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


def timed_curate(recipe, paths, executor) -> float:
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        curate(recipe, paths, out, executor=executor)
        return time.perf_counter() - start


def start_ray(cpus: int) -> float:
    """Start the local cluster before timing, as on a cluster that is already up; return its start-up time."""
    from lafid.ray_executor import init_ray

    start = time.perf_counter()
    init_ray(num_cpus=cpus)
    return time.perf_counter() - start


def peak_rss_mb(path: str) -> float:
    """Max RSS of a fresh process that curates one video sequentially."""
    code = ("import sys, resource, tempfile\n"
            "from lafid.recipe import load_recipe\nfrom lafid.runner import curate\n"
            "with tempfile.TemporaryDirectory() as out:\n"
            "    curate(load_recipe('demo'), [sys.argv[1]], out, executor='sequential')\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    result = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--long-minutes", type=float, default=10.0)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lafid-bench"))
    args = ap.parse_args()
    os.makedirs(args.cache, exist_ok=True)
    paths = []
    for i in range(args.videos):  # distinct content per video so none is skipped as a duplicate
        path = long_video(os.path.join(args.cache, f"input_{args.seconds:.0f}s_{i}.mp4"), args.seconds + i)
        paths.append(path)
    total_s = sum(args.seconds + i for i in range(args.videos))
    recipe = load_recipe("demo")
    figures = {
        "decode_only": total_s / decode_only(paths),
        "sequential": total_s / timed_curate(recipe, paths, "sequential"),
    }
    ray_start = start_ray(args.cpus)
    figures["ray"] = total_s / timed_curate(recipe, paths, "ray")
    print(f"inputs: {args.videos} videos, {total_s:.0f} s of {SIZE[0]}x{SIZE[1]} footage, recipe 'demo', {args.cpus} CPUs")
    print(f"{'runner':<14}{'video-s / wall-s':>18}")
    for name, rate in figures.items():
        print(f"{name:<14}{rate:>18.2f}")
    print(f"ray / sequential: {figures['ray'] / figures['sequential']:.2f}x  (local Ray start-up, not timed: {ray_start:.1f} s)")
    short = long_video(os.path.join(args.cache, "one_minute.mp4"), 60)
    long = long_video(os.path.join(args.cache, f"{args.long_minutes:g}_minutes.mp4"), args.long_minutes * 60)
    m1, m10 = peak_rss_mb(short), peak_rss_mb(long)
    print(f"peak RSS, 1-minute video: {m1:.0f} MB; {args.long_minutes:g}-minute video: {m10:.0f} MB; ratio {m10 / m1:.2f}")
    print(json.dumps({"throughput": figures, "peak_rss_mb": {"1min": m1, f"{args.long_minutes:g}min": m10}}))


if __name__ == "__main__":
    main()
