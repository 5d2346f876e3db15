"""Same-person threshold per identity backend, calibrated on real faces at a stated false-match rate.

Gathers real identities (`lafid.identity.calibration`: the subject track of each
real clip via Face Constraints, every face of the packaged still photos), embeds
them with ArcFace (embedded w600k_mbf, or --arcface-dir) and dlib, and prints per
backend: identities, genuine / impostor pair counts and distance percentiles, the
closest different-person pair, the threshold at --fmr, and FMR / FNMR there,
overall and for genuine pairs whose yaw differs by >= --yaw-gap degrees; then the
same rates at the backend's current default threshold. The printed thresholds are
the defaults of `ArcFaceEncoder.threshold` / `DlibEncoder.threshold`.

    python benchmarks/identity_calibration.py [--fmr 0.001] [--yaw-gap 30] [--sample-fps 4] [--arcface-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lafid import devset  # noqa: E402
from lafid.face.embed import ArcFaceEncoder, DlibEncoder  # noqa: E402
from lafid.face.track import subject  # noqa: E402
from lafid.identity import calibration as cal  # noqa: E402
from lafid.item import Item  # noqa: E402
from lafid.stage import StageWorker, pin_native_threads  # noqa: E402
from lafid.video import content_id, probe  # noqa: E402
from lafid.stages.face_constraints import FaceConstraints  # noqa: E402

def clip_faces(sample_fps: float) -> cal.Faces:
    """The subject track of every real clip, as the pipeline's Face Constraints stage hands it on."""
    paths = cal.clip_paths(devset.ensure())
    worker = StageWorker(FaceConstraints({"sample_fps": sample_fps, "min_yaw_range": 0.0, "min_blur": 0.0,
                                          "min_single_face_ratio": 0.0, "min_face_area": 0.0}))
    faces = cal.Faces()
    try:
        for path, person in paths.items():
            item = Item(source=path, video_id=content_id(path), clip_index=0, start_s=0.0,
                        end_s=probe(path).duration_s)
            (out,) = worker.run([item])[0]
            faces.add_track(person, Path(path).name, subject(out.work.get("frames", [])))
    finally:
        worker.close()
    return faces


def describe(d: np.ndarray) -> str:
    if not len(d):
        return "-"
    return "min {:.3f}  p1 {:.3f}  p50 {:.3f}  p99 {:.3f}  max {:.3f}".format(*np.percentile(d, [0, 1, 50, 99, 100]))


def fmt(r: dict) -> str:
    fnmr = "-" if r["fnmr"] is None else f"{r['fnmr']:.4f}"
    return (f"FMR {r['fmr']:.5f} over {r['people_pairs']} pairs of people (face pairs: {r['face_fmr']:.5f} of "
            f"{r['impostor']})  FNMR {fnmr} of {r['genuine']} genuine pairs")


def report(encoder, faces: cal.Faces, fmr: float, yaw_gap: float) -> None:
    emb, kept = cal.embed(encoder, faces)
    person = [faces.person[i] for i in kept]
    yaw = np.array([faces.yaw[i] for i in kept], np.float32)
    p = cal.pairs(emb, person, yaw, encoder.metric)
    thr = cal.threshold_at(p, fmr)
    a, b = (kept[k] for k in p.closest)
    print(f"\n== {encoder.name} ({encoder.metric}): {len(kept)} of {len(faces.person)} faces embedded, "
          f"{len(set(person))} identities")
    print(f"  genuine  {len(p.genuine):>7} pairs: {describe(p.genuine)}")
    print(f"  genuine, yaw gap >= {yaw_gap:g} deg {int(np.sum(p.yaw_gap >= yaw_gap)):>5} pairs: "
          f"{describe(p.genuine[p.yaw_gap >= yaw_gap])}")
    print(f"  impostor {len(p.impostor):>7} pairs: {describe(p.impostor)}")
    print(f"  closest different people: {faces.person[a]} ({faces.source[a]}) vs {faces.person[b]} "
          f"({faces.source[b]}): {p.impostor.min():.3f}")
    for label, t in ((f"threshold at FMR <= {fmr:g}", thr), ("current default", encoder.threshold)):
        print(f"  {label}: {t:.3f}")
        print(f"    all pairs:              {fmt(cal.rates(p, t))}")
        print(f"    yaw gap >= {yaw_gap:>4g} deg:      {fmt(cal.rates(p, t, yaw_gap))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fmr", type=float, default=1e-3, help="false-match rate the threshold is set at")
    ap.add_argument("--yaw-gap", type=float, default=30.0, help="genuine pairs at least this many degrees apart")
    ap.add_argument("--sample-fps", type=float, default=4.0, help="frames per second taken from each clip")
    ap.add_argument("--arcface-dir", help="insightface models folder; default: the embedded w600k_mbf")
    args = ap.parse_args()
    pin_native_threads(1)
    faces = cal.photo_faces(clip_faces(args.sample_fps))
    print("sources (licence manifest; read from installed packages and the dev-set cache, never committed):")
    for name, (origin, licence, what) in cal.SOURCES.items():
        print(f"  {name:<26} {origin}; {licence}; {what}")
    people = {p: faces.person.count(p) for p in dict.fromkeys(faces.person)}
    print(f"{len(people)} identities, {len(faces.person)} faces: "
          + ", ".join(f"{p} {n}" for p, n in people.items() if n > 1) + f", {sum(n == 1 for n in people.values())} "
          "photo faces of one person each")
    for encoder in (ArcFaceEncoder(args.arcface_dir or "/nonexistent"), DlibEncoder()):
        report(encoder, faces, args.fmr, args.yaw_gap)


if __name__ == "__main__":
    main()
