"""Speaking labels on real talking footage: the dev set and its extra talkers.

Every clip goes through Face Constraints (loosened so every clip is kept: the
point is the speech decision) and Speech Disambiguation with the parameters of
the default recipe. Printed: per clip the expected label, the label given, the
sync score and lag, lip activity; the confusion matrix; the sync score
distribution per true relation (own voice / other voice / own voice shifted);
and the CPU cost of the stage per speech-second, with and without the mouth
pass at the source frame rate (the part the sync decision added), measured in
the same run.

    python benchmarks/speech_labels.py [--recipe lafid180k] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter

from lafid import devset
from lafid.item import Item
from lafid.recipe import load_recipe
from lafid.stage import StageWorker
from lafid.video import content_id, probe
from stages.face_constraints import FaceConstraints
from stages.speech_disambiguation import SpeechDisambiguation

LOOSE_FACES = {"sample_fps": 8.0, "min_face_ratio": 0.3, "min_single_face_ratio": 0.0, "min_yaw_range": 0.0,
               "min_blur": 0.0, "min_face_area": 0.0}


def speech_params(recipe: str) -> dict:
    for spec in load_recipe(recipe).stages:
        if spec.stage == SpeechDisambiguation.name:
            return dict(spec.params)
    raise SystemExit(f"recipe {recipe} has no {SpeechDisambiguation.name} stage")


class CpuClock:
    """Wraps a callable and adds up the process CPU seconds spent inside it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="lafid180k")
    ap.add_argument("--json", help="also write the per-clip rows here")
    ap.add_argument("--lip-detector", choices=["mesh", "vvad"], help="override the recipe's lip_detector")
    args = ap.parse_args()

    faces = StageWorker(FaceConstraints(LOOSE_FACES))
    params = speech_params(args.recipe)
    if args.lip_detector:
        params["lip_detector"] = args.lip_detector
    speech = StageWorker(SpeechDisambiguation(params))
    mouth_pass = CpuClock(speech.stage.mouth.series)
    speech.stage.mouth.series = mouth_pass
    rows, stage_cpu, speech_s = [], 0.0, 0.0
    for path, clip in devset.labelled_clips():
        info = probe(str(path))
        item = Item(source=str(path), video_id=content_id(str(path)), clip_index=0, clip_count=1,
                    start_s=0.0, end_s=info.duration_s, columns={"fps": info.fps})
        (item,), _ = faces.run([item])
        start = time.process_time()
        (item,), _ = speech.run([item])
        stage_cpu += time.process_time() - start
        c = item.columns
        speech_s += sum(e - s for s, e in c.get("speech_segments") or [])
        ok = c.get("speaking_label") in (clip.expected, *clip.accepted)
        rows.append({"clip": clip.file, "expected": clip.expected, "label": c.get("speaking_label"), "ok": ok,
                     "sync": c.get("av_sync"), "lag_s": c.get("av_lag_s"), "lip_activity": c.get("lip_activity"),
                     "visual_speaking": c.get("visual_speaking"), "reject": None if item.reject is None else item.reject.reason})
    faces.close()
    speech.close()

    fmt = "{:<30} {:<11} {:<11} {:>6} {:>7} {:>6} {:>6}  {}"
    print(fmt.format("clip", "expected", "label", "sync", "lag_s", "lips", "vvad", "ok"))
    for r in rows:
        num = (lambda v, f: "-" if v is None else f.format(v))
        print(fmt.format(r["clip"][:30], r["expected"], str(r["label"]), num(r["sync"], "{:.2f}"),
                         num(r["lag_s"], "{:+.2f}"), num(r["lip_activity"], "{:.3f}"),
                         num(r["visual_speaking"], "{:.2f}"), "yes" if r["ok"] else "NO"))
    labels = sorted({r["expected"] for r in rows} | {str(r["label"]) for r in rows})
    confusion = Counter((r["expected"], str(r["label"])) for r in rows)
    print("\nconfusion (rows: expected, columns: given)")
    print(" " * 12 + "".join(f"{lab[:10]:>11}" for lab in labels))
    for exp in labels:
        if any(r["expected"] == exp for r in rows):
            print(f"{exp[:11]:<12}" + "".join(f"{confusion[(exp, got)]:>11}" for got in labels))
    groups = {"own voice": lambda r: r["expected"] == "speaking",
              "voice 1 s late": lambda r: "delay1s" in r["clip"],
              "other voice": lambda r: r["expected"] == "voice_over" and "delay1s" not in r["clip"]}
    print("\nsync score by relation of voice to face")
    for name, member in groups.items():
        scores = sorted(r["sync"] for r in rows if member(r) and r["sync"] is not None)
        print(f"  {name:<15} " + " ".join(f"{s:.2f}" for s in scores))
    mouth_cpu = mouth_pass.seconds
    print(f"\nspeech-seconds {speech_s:.1f}; stage CPU-s per speech-second: {stage_cpu / speech_s:.3f} with the "
          f"mouth pass, {(stage_cpu - mouth_cpu) / speech_s:.3f} without (mouth pass {mouth_cpu / speech_s:.3f})")
    print(f"correct: {sum(r['ok'] for r in rows)} of {len(rows)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
