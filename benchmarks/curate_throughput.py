"""Curation throughput and memory, side by side in one run on the same inputs.

Three inputs (`--case`):

- `talking` (default): the real dev-set footage with audio (`lafid.devset`, its eight clips and the
  extra talkers, 112.5 s), curated with the default recipe loosened as in issue 24 (`min_clip_s` 1.5,
  `min_single_face_ratio` 0.5, `min_yaw_range` 0) so that dialogue shots reach the speech stage;
- `talking3`: the same clips three times, as shipped and in two encodings the pipeline must decide the
  same on (`devset.encoded`: H.264 CRF 30, VP9/WebM; distinct files, so none is skipped as a duplicate),
  337 s: a run long enough that Ray's fixed costs (starting actors) weigh as they would on more footage;
- `carphone`: the earlier synthetic input, carphone footage, its mirror and two still portraits looped
  to `--videos` videos of `--seconds` seconds, without audio.

Prints video-seconds per wall-second for: decode-only of every frame (the floor the pipeline cannot
beat); decoding with the stages' one scaler thread against PyAV's default (a thread pool per frame),
alone and beside a busy core, in milliseconds per frame; then `--repeat` rounds (default 2) of the
sequential runner, the Ray runner with a pool per stage
(`ray_per_stage`: the recipe with `pools: per_stage`) and the Ray runner as the recipe says (the default recipe's
`pools: auto`: on 2 CPUs each actor runs the whole chain of stages), on a local
cluster started before timing (its start-up time is printed); each round's rates and Ray / sequential
ratios, then their median and spread: on a shared machine one run's ratio is noise. From the last round:
per stage, CPU-seconds per video-second measured inside the workers (process CPU time around each
`StageWorker.run`, every thread of the worker counted) for both runners, actors started and their
start-up CPU (in all and per actor); CPU-seconds of every process of the run (the driver, Ray's daemons,
each stage's actors) and what Ray costs beyond the stages' own work, by where it goes; the share of its actors' time each Ray pool was busy, the actors per
pool over time and the seconds with n batches running at once (fewer than the CPUs: idle cores); the
bytes the Ray driver received per clip. Then the memory of the sequential runner on a 1-minute
and a `--long-minutes` video of the same case, each in a fresh process: peak RSS, and how far RSS
rises after the first clip is written.

    python benchmarks/curate_throughput.py [--case talking|talking3|carphone] [--recipe lafid180k] [--cpus 2] [--repeat 2]
        [--memory-only | --throughput-only] [--videos 8] [--seconds 60] [--long-minutes 10]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import shutil
import subprocess
import sys
import tempfile
import time

import av

from lafid import devset, media
from lafid.ray_executor.pool import CHAIN
from lafid.recipe import load_recipe
from lafid.shards import read_clips
from lafid.runner import curate
from lafid.video import SCALER_THREADS

from cpu_meter import CpuMeter  # beside this script

SIZE = (480, 360)
# issue 24: the default recipe, loosened so that dialogue shots of the dev set reach the speech stage
LOOSENED = {"shot_split": {"min_clip_s": 1.5}, "face_constraints": {"min_single_face_ratio": 0.5, "min_yaw_range": 0.0}}
REENCODED = ("crf30", "vp9")  # `talking3`: the dev set again in these encodings (lafid.devset.ENCODINGS)


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


def talking_video(path: str, seconds: float) -> str:
    """A talking-head clip of the dev set with its voice (testMovie), looped to length with ffmpeg."""
    if os.path.exists(path):
        return path
    source = devset.ensure() / "extra" / "testMovie.mp4"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", "-1", "-i", str(source), "-t", f"{seconds:g}",
                    "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-c:a", "aac", path], check=True)
    return path


def duration_s(path: str) -> float:
    with av.open(path) as c:
        return float(c.duration) / av.time_base


def decode_only(paths: list[str], threads: int = SCALER_THREADS, max_frames: int = 0) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and frames to decode every frame (the first `max_frames`, 0: all) to BGR,
    with `threads` scaler threads."""
    wall, cpu, frames = time.perf_counter(), time.process_time(), 0
    for frame in itertools.islice(every_frame(paths), max_frames or None):
        frame.to_ndarray(format="bgr24", threads=threads)
        frames += 1
    return time.perf_counter() - wall, time.process_time() - cpu, frames


def every_frame(paths: list[str]):
    """Each decoded frame of each path in turn."""
    for p in paths:
        with av.open(p) as c:
            c.streams.video[0].thread_type = "AUTO"
            yield from c.decode(video=0)


def frame_conversion(paths: list[str], max_frames: int = 1500) -> dict[str, float]:
    """Decode and convert to BGR with one scaler thread (`SCALER_THREADS`, the stages') against PyAV's default
    (threads=0: a scaler thread pool made and ended for every frame), alone and beside a core kept busy,
    as a Ray actor runs beside another: wall and CPU milliseconds per frame."""
    figures, rows = {}, []
    for beside in ("alone", "beside_busy_core"):
        spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if beside != "alone" else None
        try:
            for name, threads in (("one_scaler_thread", SCALER_THREADS), ("pyav_default", 0)):
                wall, cpu, n = decode_only(paths, threads, max_frames)
                figures[f"{beside}.{name}.wall_ms"], figures[f"{beside}.{name}.cpu_ms"] = 1e3 * wall / n, 1e3 * cpu / n
                rows.append(f"{beside.replace('_', ' ')}, {name.replace('_', ' ')}: {1e3 * wall / n:.2f} ms wall, "
                            f"{1e3 * cpu / n:.2f} ms CPU")
        finally:
            if spinner:
                spinner.kill()
                spinner.wait()
    print(f"decode and convert to BGR, per frame (first {max_frames} frames): " + "; ".join(rows))
    return {f"frame_conversion.{k}": v for k, v in figures.items()}


def timed_curate(recipe, paths, executor) -> tuple[float, object, list[str]]:
    """Wall seconds, run stats, and every clip's outcome (speaking label or reject reason)."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        stats = curate(recipe, paths, out, executor=executor)
        seconds = time.perf_counter() - start
        return seconds, stats, outcomes(out)


def outcomes(out: str) -> list[str]:
    """'file#clip: label' for kept clips, 'file#clip: stage/reason' for rejects, sorted: to compare runs."""
    rows = []
    for kind, what in (("clips", ["speaking_label"]), ("rejects", ["stage", "reason"])):
        table = read_clips(out, ["source", "clip_index", *what], kind)
        for r in table.to_pylist() if table is not None else []:
            rows.append(f"{os.path.basename(r['source'])}#{r['clip_index']}: " + "/".join(str(r[w]) for w in what))
    return sorted(rows)


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


def case_recipe(case: str, name: str):
    recipe = load_recipe(name)
    if case.startswith("talking"):
        for spec in recipe.stages:
            spec.params.update(LOOSENED.get(spec.stage, {}))
    return recipe


def case_inputs(args) -> list[str]:
    if args.case.startswith("talking"):
        clips = [path for path, _ in devset.labelled_clips()]
        more = [devset.encoded(path, enc) for enc in REENCODED for path in clips] if args.case == "talking3" else []
        return [str(path) for path in clips + more]
    # distinct content per video so none is skipped as a duplicate
    return [long_video(os.path.join(args.cache, f"input_{args.seconds:.0f}s_{i}.mp4"), args.seconds + i)
            for i in range(args.videos)]


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
recipe = load_recipe(sys.argv[2])
for spec in recipe.stages:
    spec.params.update(json.loads(sys.argv[3]).get(spec.stage, {}))
with tempfile.TemporaryDirectory() as out:
    curate(recipe, [sys.argv[1]], out, executor="sequential", on_update=on_update)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **seen}))
"""


def memory_mb(path: str, recipe: str, params: dict) -> dict[str, float]:
    """A fresh process curates one video: its peak RSS, and how far RSS rose after the first clip was written
    (models are loaded by then, so that rise is what processing the rest of the video costs)."""
    result = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, recipe, json.dumps(params)],
                            capture_output=True, text=True, check=True)
    m = json.loads(result.stdout.strip().splitlines()[-1])
    return {"peak": m["peak"] / 2**20, "growth": (m["max"] - m["first"]) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=["talking", "talking3", "carphone"], default="talking")
    ap.add_argument("--recipe", default="lafid180k", help="bundled name or path (default: the default recipe)")
    ap.add_argument("--videos", type=int, default=8, help="carphone case: videos")
    ap.add_argument("--seconds", type=float, default=60.0, help="carphone case: seconds per video")
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="rounds of sequential, Ray per stage and Ray")
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
    talking = args.case.startswith("talking")
    make = talking_video if talking else long_video
    if talking and not shutil.which("ffmpeg"):
        sys.exit("the talking memory case needs ffmpeg")
    params = LOOSENED if talking else {}
    short = make(os.path.join(args.cache, f"{args.case}_1_minute.mp4"), 60)
    long = make(os.path.join(args.cache, f"{args.case}_{args.long_minutes:g}_minutes.mp4"), args.long_minutes * 60)
    m1, m10 = memory_mb(short, args.recipe, params), memory_mb(long, args.recipe, params)
    print(f"peak RSS ({args.case}), 1-minute video: {m1['peak']:.0f} MB; {args.long_minutes:g}-minute video: "
          f"{m10['peak']:.0f} MB; ratio {m10['peak'] / m1['peak']:.2f}")
    print(f"RSS rise after the first clip: {m1['growth']:.0f} MB (1 min) vs {m10['growth']:.0f} MB ({args.long_minutes:g} min)")
    print(json.dumps({"throughput": figures, "memory_mb": {"1min": m1, f"{args.long_minutes:g}min": m10}}))


def pool_sizes(sizes: list[tuple[float, dict[str, int]]]) -> list[str]:
    """The actors per pool each time they changed: 't=12s shot_split 1, face_constraints 2, ...'."""
    lines, last = [], None
    for t, now in sizes:
        if now != last:
            lines.append(f"t={t:5.1f}s " + ", ".join(f"{k} {v}" for k, v in now.items()))
            last = now
    return lines


def actor_seconds(sizes: list[tuple[float, dict[str, int]]], end: float) -> dict[str, float]:
    """Seconds each pool's actors were alive (started or starting), summed over actors."""
    total: dict[str, float] = {}
    for (t, now), nxt in zip(sizes, [s[0] for s in sizes[1:]] + [end]):
        for k, v in now.items():
            total[k] = total.get(k, 0.0) + v * max(0.0, nxt - t)
    return total


def pool_table(runner: str, run: dict, figures: dict) -> None:
    """Per Ray pool: the share of its actors' lifetime they were busy, actors started and their start-up CPU."""
    info, stages = run["stats"].ray, run["stats"].stages
    alive = actor_seconds(info.sizes, run["seconds"])
    print(f"{runner + ' pool':<24}{'busy/actor-s':>14}{'actors started':>16}{'start-up CPU-s (each)':>23}")
    for name in info.started:
        busy = sum(st.seconds for k, st in stages.items() if k == name or name == CHAIN)  # a chain runs every stage
        share = busy / alive[name] if alive.get(name) else float("nan")
        print(f"{name:<24}{share:>14.0%}{info.started[name]:>16}{info.startup_cpu_s[name]:>16.1f}"
              f" ({info.startup_cpu_s[name] / max(1, info.started[name]):.2f})")
        figures[f"{runner}_busy_share.{name}"] = share


def beyond_stages(by_role: dict[str, float], stats, run, total_s: float) -> dict[str, float]:
    """Print and return what the Ray run's CPU went to beyond the stages' own work (`StageWorker.run`)."""
    actors = sum(v for k, v in by_role.items() if k.startswith("ray::") and k[5:] in run.requests)  # pools' actors
    startup, work = sum(run.startup_cpu_s.values()), sum(st.cpu_seconds for st in stats.stages.values())
    parts = {"actor_startup": startup, "actors_between_batches": actors - startup - work,
             "daemons_and_others": sum(by_role.values()) - actors - by_role.get("driver", 0.0), "driver": by_role.get("driver", 0.0)}
    print(f"Ray beyond the stages' work ({work:.1f} CPU-s), CPU-s: " + ", ".join(
        f"{k.replace('_', ' ')} {v:.1f}" for k, v in parts.items()) + f"; {sum(parts.values()) / total_s:.3f} per video-s")
    return {f"ray_cpu_s.{k}": v for k, v in parts.items()}


def one_round(recipe, paths, total_s: float) -> dict:
    """Sequential, Ray with a pool per stage and Ray as the recipe says, one after the other on the same inputs."""
    runs = {}
    per_stage = recipe.model_copy(update={"pools": "per_stage"})
    for name, executor, how in (("sequential", "sequential", recipe), ("ray_per_stage", "ray", per_stage),
                                ("ray", "ray", recipe)):
        with CpuMeter() as cpu:
            seconds, stats, out = timed_curate(how, paths, executor)
        runs[name] = {"seconds": seconds, "rate": total_s / seconds, "stats": stats, "outcomes": out,
                      "cpu_per_video_s": cpu.seconds / total_s, "cpu_by_role": cpu.by_role(),
                      "actors_rss_peak_mb": cpu.actors_rss_peak / 2**20}
    differ = {k: sorted(set(runs[k]["outcomes"]) ^ set(runs["sequential"]["outcomes"])) for k in ("ray_per_stage", "ray")}
    assert not any(differ.values()), f"the runners disagree (outcomes not in both): {differ}"
    return runs


def throughput(args) -> dict[str, float]:
    """Video-seconds per wall-second: decode only, then `--repeat` rounds of the sequential runner, Ray with a
    pool per stage and Ray as the recipe says, on the same inputs; per stage, CPU-seconds per video-second from the last round."""
    paths = case_inputs(args)
    total_s = sum(duration_s(p) for p in paths)
    recipe = case_recipe(args.case, args.recipe)
    figures = {"decode_only": total_s / decode_only(paths)[0], **frame_conversion(paths)}
    ray_start = start_ray(args.cpus)
    rounds = []
    for i in range(args.repeat):
        runs = one_round(recipe, paths, total_s)
        rounds.append(runs)
        print(f"round {i + 1}: video-s / wall-s: sequential {runs['sequential']['rate']:.2f}, ray_per_stage "
              f"{runs['ray_per_stage']['rate']:.2f} ({runs['ray_per_stage']['rate'] / runs['sequential']['rate']:.2f}x), "
              f"ray {runs['ray']['rate']:.2f} ({runs['ray']['rate'] / runs['sequential']['rate']:.2f}x); CPU-s per "
              f"video-s, all processes: " + ", ".join(f"{k} {r['cpu_per_video_s']:.3f}" for k, r in runs.items()),
              flush=True)
    seq, par = rounds[-1]["sequential"]["stats"], rounds[-1]["ray"]["stats"]
    ray_s, seq_s = rounds[-1]["ray"]["seconds"], rounds[-1]["sequential"]["seconds"]
    last_run = par.ray
    clips = par.kept + par.rejected
    print("outcomes (all runners): " + "; ".join(rounds[-1]["sequential"]["outcomes"]))
    print(f"case {args.case!r}: {len(paths)} videos, {total_s:.1f} s of footage, recipe {recipe.name!r}, "
          f"{args.cpus} CPUs; {par.kept} clips kept, {par.rejected} rows rejected (every runner); local Ray start-up, "
          f"not timed: {ray_start:.1f} s")
    print(f"{'runner':<14}{'video-s / wall-s (median, min-max of ' + str(len(rounds)) + ')':>44}{'x sequential':>28}")
    print(f"{'decode_only':<14}{figures['decode_only']:>44.2f}")
    for name in ("sequential", "ray_per_stage", "ray"):
        rates = sorted(r[name]["rate"] for r in rounds)
        ratios = sorted(r[name]["rate"] / r["sequential"]["rate"] for r in rounds)
        figures[name] = statistics.median(rates)
        figures[f"{name}_x_sequential"] = statistics.median(ratios)
        figures[f"{name}_cpu_per_video_s"] = statistics.median(r[name]["cpu_per_video_s"] for r in rounds)
        print(f"{name:<14}{figures[name]:>30.2f} ({rates[0]:.2f}-{rates[-1]:.2f})"
              f"{figures[name + '_x_sequential']:>16.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})")
    ceiling = args.cpus * figures["sequential_cpu_per_video_s"] / figures["ray_cpu_per_video_s"]
    figures["ray_ceiling_x_sequential"] = ceiling
    startup = sum(last_run.startup_cpu_s.values()) / total_s
    figures["ray_ceiling_without_startup"] = args.cpus * figures["sequential_cpu_per_video_s"] / (
        figures["ray_cpu_per_video_s"] - startup)
    print(f"CPU-s per video-s, all processes (median): sequential {figures['sequential_cpu_per_video_s']:.3f}, "
          f"ray {figures['ray_cpu_per_video_s']:.3f}: on {args.cpus} otherwise idle cores, where the sequential "
          f"runner keeps one busy, Ray can be at most {ceiling:.2f}x sequential; without its actors' start-up "
          f"({startup:.3f} CPU-s per video-s here, spread thinner on longer runs) "
          f"{figures['ray_ceiling_without_startup']:.2f}x")
    print(f"{'stage':<24}{'items':>6}{'seq CPU-s/video-s':>19}{'ray CPU-s/video-s':>19}")
    for name, st in seq.stages.items():
        rt = par.stages.get(name)
        print(f"{name:<24}{st.items_in:>6}{st.cpu_seconds / total_s:>19.3f}{(rt.cpu_seconds if rt else 0) / total_s:>19.3f}")
        figures[f"cpu_per_video_s.{name}"] = st.cpu_seconds / total_s
    seq_cpu = sum(st.cpu_seconds for st in seq.stages.values()) / total_s
    ray_cpu = sum(st.cpu_seconds for st in par.stages.values()) / total_s
    print(f"{'all stages':<24}{'':>6}{seq_cpu:>19.3f}{ray_cpu:>19.3f}")
    figures["stages_cpu_per_video_s"], figures["ray_stages_cpu_per_video_s"] = seq_cpu, ray_cpu
    for name in ("ray_per_stage", "ray"):
        pool_table(name, rounds[-1][name], figures)
        figures[f"{name}_actors_rss_peak_mb"] = peak = max(r[name]["actors_rss_peak_mb"] for r in rounds)
        print(f"  its actors' resident memory together, peak of {len(rounds)} rounds: {peak:.0f} MB")
    for name in ("sequential", "ray_per_stage", "ray"):
        roles = sorted(rounds[-1][name]["cpu_by_role"].items(), key=lambda kv: -kv[1])
        print(f"CPU-s, all processes, {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in roles if v >= 0.05))
    figures.update(beyond_stages(rounds[-1]["ray"]["cpu_by_role"], par, last_run, total_s))
    for name in ("ray_per_stage", "ray"):
        info = rounds[-1][name]["stats"].ray
        print(f"{name}: actors per pool over time (when it changed; every pool's first actor was set up after "
              f"{info.setup_s:.1f} s, no work before that):")
        for line in pool_sizes(info.sizes):
            print("  " + line)
    for name in ("ray_per_stage", "ray"):
        print(f"actors started per pool, {name}, each round: " + "; ".join(
            ", ".join(f"{k} {v}" for k, v in r[name]["stats"].ray.started.items()) for r in rounds))
    working = sorted(last_run.working_s.items())
    print("after set-up, seconds with n batches running at once: " + ", ".join(f"{n}: {t:.1f}" for n, t in working)
          + f"; idle cores without other work: {sum(max(0, args.cpus - n) * t for n, t in working):.1f} core-s")
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
    return figures


if __name__ == "__main__":
    main()
