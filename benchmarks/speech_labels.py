"""Speaking labels on real talking footage, in every encoding, and where the thresholds come from.

Every clip of the dev set and its extra talkers (`make dev-media`) is judged as
it is and re-encoded (`lafid.devset.ENCODINGS`: H.264 CRF 18 and 30, 360p,
VP9/WebM, MOV and MKV remux), and its first 3 s in each encoding, through Face Constraints (loosened so every clip is
kept: the point is the speech decision) and Speech Disambiguation with the
recipe's parameters. Printed:
- per clip and encoding the label and its evidence; precision of `speaking` and
  of `voice_over`, share `uncertain` (of clips >= 3.3 s), label flips (one clip,
  two different confident labels across its encodings);
- the spread of each score across the encodings of one clip;
- the null distribution: the mouth of every clip whose expected label is
  `speaking` against its own voice (positives), the same voice shifted by 1-2.5 s
  and the voices of the other `speaking` clips (negatives), each time over the
  mouth frames the stage would measure for that voice (its speech and
  `mouth_margin_s` around it); the in-step score of
  each, the out-of-step peak score of shifted voices (positives) and other voices
  (negatives), and the thresholds these give at the false-alarm rate asked for;
- own voices' in-step score by speech length, and what each out-of-step peak
  threshold buys (false peaks of other voices against voices 1 s late found),
  alone and with the peak required to agree across the window's halves or across
  the three bands (measured, not used by the stage: docs/speech.md);
- the labels those thresholds would give, replayed from the stored columns.
Only labels.csv says which clip is which; no file name enters a decision.

    PYTHONPATH=. python benchmarks/speech_labels.py [--recipe lafid180k] [--false-alarm 0.01] [--excerpt-s 3]
                                                      [--lip-detector vvad] [--param NAME=VALUE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import yaml

from lafid import devset
from lafid.item import Item
from lafid.recipe import load_recipe
from lafid.speech.audio import RATE, extract_audio
from lafid.speech.vad import SileroVAD, around, within
from lafid.speech.sync import lag_curve, score_curve, z_at
from lafid.stage import StageWorker
from lafid.video import content_id, probe
from lafid.stages.face_constraints import FaceConstraints
from lafid.stages.speech_disambiguation import SpeechDisambiguation, SpeechDisambiguationParams, decide

LOOSE_FACES = {"sample_fps": 8.0, "min_face_ratio": 0.3, "min_single_face_ratio": 0.0, "min_yaw_range": 0.0,
               "min_blur": 0.0, "min_face_area": 0.0}
CONFIDENT = ("speaking", "voice_over")
SHIFTS_S = (1.0, 1.5, 2.0, 2.5)  # own voice moved by this much: out of step, with a true peak at the shift
MIN_LONG_S = 3.3  # the uncertain-share target counts clips at least this long
WINDOWS_S = (4.0, 6.0)  # parts of each clip that enter the null distribution beside the whole clip
OTHER_OFFSETS_S = (0.0, 1.7, 3.1)  # each other voice enters at these offsets
HALF_AGREE_S = 0.1  # a peak "agrees" in a half of the clip when that half's own curve peaks this close to it


def speech_params(recipe: str) -> dict:
    for spec in load_recipe(recipe).stages:
        if spec.stage == SpeechDisambiguation.name:
            return {**spec.params, "asr_backend": "none"}  # the label does not read the transcript
    raise SystemExit(f"recipe {recipe} has no {SpeechDisambiguation.name} stage")


class Recorder:
    """Wraps the stage's mouth pass: keeps the CPU seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.process_time()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.process_time() - start


def variants(path, excerpt_s: float | None):
    """(encoding name, clip suffix, file) for the clip as it is, in every encoding, and its first
    `excerpt_s` seconds in every encoding (short clips are where chance agreement is largest)."""
    yield "original", "", path
    for encoding in devset.ENCODINGS:
        yield encoding, "", devset.encoded(path, encoding)
    for encoding in devset.ENCODINGS if excerpt_s else ():
        yield encoding, f"[:{excerpt_s:g}s]", devset.encoded(path, encoding, seconds=excerpt_s)


def judge_all(params: dict, excerpt_s: float | None) -> tuple[list[dict], float, float, float]:
    """One row per clip x encoding; plus stage CPU-s, mouth-pass CPU-s and speech-seconds."""
    faces, speech = StageWorker(FaceConstraints(LOOSE_FACES)), StageWorker(SpeechDisambiguation(params))
    mouth = Recorder(speech.stage.mouth.series)
    speech.stage.mouth.series = mouth
    rows, stage_cpu, speech_s = [], 0.0, 0.0
    try:
        for path, clip in devset.labelled_clips():
            for encoding, part, source in variants(path, excerpt_s):
                info = probe(str(source))
                item = Item(source=str(source), video_id=content_id(str(source)), clip_index=0, clip_count=1,
                            start_s=0.0, end_s=info.duration_s, columns={"fps": info.fps})
                (item,), _ = faces.run([item])
                if item.rejected:  # too few face frames in a short excerpt: no speech decision to judge
                    continue
                start = time.process_time()
                (item,), _ = speech.run([item])
                stage_cpu += time.process_time() - start
                c = item.columns
                speech_s += sum(e - s for s, e in c.get("speech_segments") or [])
                whole = None
                if clip.expected == "speaking" and c.get("speech_segments"):  # the null's mouths: every frame
                    whole = mouth.fn(str(source), 0.0, [(0.0, info.duration_s)], c["frame_t"], c["frame_box"],
                                     max(info.fps, speech.stage.params.mouth_min_fps))
                rows.append({"clip": clip.file + part, "encoding": encoding, "expected": clip.expected,
                             "accepted": [clip.expected, *clip.accepted], "duration_s": info.duration_s,
                             "label": c.get("speaking_label"), "columns": c, "series": whole,
                             "source": str(source)})
    finally:
        faces.close()
        speech.close()
    return rows, stage_cpu, mouth.seconds, speech_s


def label_figures(rows: list[dict], label_of) -> dict:
    """Precision of each confident label, share uncertain of long clips, flips across encodings."""
    out = {}
    for lab in CONFIDENT:
        given = [r for r in rows if label_of(r) == lab]
        right = sum(lab in r["accepted"] for r in given)
        out[f"precision_{lab}"] = (right / len(given) if given else float("nan"), right, len(given))
    long = [r for r in rows if r["duration_s"] >= MIN_LONG_S]
    out["uncertain_share"] = (sum(label_of(r) == "uncertain" for r in long) / max(len(long), 1), len(long))
    by_clip = defaultdict(set)
    for r in rows:
        by_clip[r["clip"]].add(label_of(r))
    out["flips"] = sorted(c for c, labs in by_clip.items() if len(labs & set(CONFIDENT)) > 1)
    out["changes"] = sorted(c for c, labs in by_clip.items() if len(labs) > 1)
    return out


def print_figures(title: str, fig: dict) -> None:
    sp, vo = fig["precision_speaking"], fig["precision_voice_over"]
    print(f"{title}: precision speaking {sp[0]:.2f} ({sp[1]}/{sp[2]}), voice_over {vo[0]:.2f} ({vo[1]}/{vo[2]}), "
          f"uncertain {fig['uncertain_share'][0]:.0%} of {fig['uncertain_share'][1]} clip-encodings >= "
          f"{MIN_LONG_S} s, flips {len(fig['flips'])} {fig['flips']}, clips whose label changes at all "
          f"{len(fig['changes'])} {fig['changes']}")


def speech_seconds(row: dict) -> float:
    return sum(e - s for s, e in row["columns"].get("speech_segments") or [])


def spread(rows: list[dict], p: SpeechDisambiguationParams) -> dict:
    """Per score, the range (max - min) each clip's value spans across its encodings; `moving_sync`
    is av_sync where the out-of-step rule reads it: lips that move, speech long enough for sync."""
    out = {}
    moving = {r["clip"] for r in rows} - {r["clip"] for r in rows
                                          if (r["columns"].get("lip_activity") or 0.0) < p.max_still_lips
                                          or speech_seconds(r) < p.min_sync_speech_s}
    for key, clips in (("av_sync", None), ("moving_sync", moving), ("av_peak_z", None), ("lip_activity", None)):
        ranges = {}
        for clip in clips or {r["clip"] for r in rows}:
            vals = [r["columns"].get(key.replace("moving_sync", "av_sync")) for r in rows if r["clip"] == clip]
            vals = [v for v in vals if v is not None]
            if len(vals) > 1:
                ranges[clip] = max(vals) - min(vals)
        out[key] = ranges
    return out


def windows(row: dict, min_speech_s: float) -> list[tuple[float, float]]:
    """The whole clip and sliding WINDOWS_S-long parts of it that hold at least `min_speech_s` of
    speech: the null must cover the short clips real footage brings, not only whole dev clips."""
    dur, segs = row["duration_s"], row["columns"]["speech_segments"]
    spans = [(0.0, dur)] + [(float(a), float(a) + w) for w in WINDOWS_S for a in np.arange(0.0, dur - w + 1e-9, 1.0)]
    return [(a, b) for a, b in spans if sum(max(0.0, min(e, b) - max(s, a)) for s, e in segs) >= min_speech_s]


def null_distribution(rows: list[dict], p: SpeechDisambiguationParams) -> dict:
    """In-step scores and out-of-step peaks of own, shifted and other voices (module docstring),
    over every window of every `speaking` clip in every encoding."""
    own = [r for r in rows if r["expected"] == "speaking" and r["series"] is not None]
    audio = {r["source"]: extract_audio(r["source"], 0.0, r["duration_s"]).samples for r in own}
    voices = {r["clip"]: audio[r["source"]] for r in own if r["encoding"] == "original"}
    vad = SileroVAD(1, p.vad_threshold, p.vad_min_speech_s, p.vad_min_silence_s, p.vad_pad_s)
    out = defaultdict(list)
    for r in own:
        s, a = r["series"], audio[r["source"]]
        height = s.lip_height
        for w0, w1 in windows(r, p.min_sync_speech_s):
            cut = slice(int(w0 * RATE), int(w1 * RATE))

            def heard(x):
                """The window's mouth frames the stage would measure for voice x: its speech and the margin
                around it (None when x has too little speech there for sync)."""
                segments = vad.segments(x[cut])
                if sum(e - b for b, e in segments) < p.min_sync_speech_s:
                    return None
                return (s.t >= w0) & (s.t < w1) & within(s.t - w0, around(segments, p.mouth_margin_s, w1 - w0))

            def scored(x):
                """(score_curve result, lowest band z at its peak: `banded`; the mouth frames used)."""
                inside = heard(x)
                curve = None if inside is None else lag_curve(s.t[inside] - w0, height[inside], x[cut],
                                                              p.min_sync_frames, per_band=True)
                return (None, float("-inf"), inside) if curve is None else (*banded(*curve, p.max_lag_s), inside)

            def halves_agree(x, res, inside) -> bool:
                """Both halves of the window's mouth frames peak within HALF_AGREE_S of the whole's peak."""
                if res is None or res.peak_lag_s is None:
                    return False
                t, h = s.t[inside] - w0, height[inside]
                mid = np.median(t[np.isfinite(h)])
                for part in (t < mid, t >= mid):
                    curve = lag_curve(t[part], h[part], x[cut], p.min_sync_frames // 2)
                    if curve is None or abs(curve[0][np.argmax(curve[1])] - res.peak_lag_s) > HALF_AGREE_S:
                        return False
                return True

            res, _, _ = scored(a)
            if res is not None:
                out["own"].append(res.score)
                out["own_speech_s"].append(sum(max(0.0, min(e, w1) - max(b, w0))
                                               for b, e in r["columns"]["speech_segments"]))
            for shift in SHIFTS_S:
                x = np.roll(a, int(shift * RATE))
                res, bands, inside = scored(x)
                if res is not None:
                    out["shifted"].append(res.score)
                    found = res.peak_lag_s is not None and abs(res.peak_lag_s - shift) <= 0.15
                    out["shifted_peak"].append(res.peak_score if found else float("-inf"))
                    out["shifted_bands"].append(bands if found else float("-inf"))
                    out["shifted_halves"].append(found and halves_agree(x, res, inside))
                    out["shifted_by"].append(shift)
                    out["shifted_lag"].append(np.nan if res.peak_lag_s is None else res.peak_lag_s)
            for clip, voice in voices.items():
                for offset in OTHER_OFFSETS_S if clip != r["clip"] else ():
                    x = np.roll(np.resize(voice, len(a)), int(offset * RATE))
                    res, bands, inside = scored(x)
                    if res is not None:
                        out["other"].append(res.score)
                        out["other_peak"].append(float("-inf") if res.peak_score is None else res.peak_score)
                        out["other_lag"].append(np.nan if res.peak_lag_s is None else res.peak_lag_s)
                        out["other_bands"].append(bands)
                        out["other_halves"].append(halves_agree(x, res, inside))
    return out


def banded(lags: np.ndarray, per_band: np.ndarray, max_lag_s: float):
    """(score_curve of the bands' mean curve, the lowest z of the single-band curves at its peak's
    lag): does every band peak where the mean does? -inf without a peak."""
    res = score_curve(lags, per_band.mean(axis=1), max_lag_s)
    zs = [] if res is None or res.peak_lag_s is None else [z_at(lags, per_band[:, j], res.peak_lag_s)
                                                            for j in range(per_band.shape[1])]
    return res, (min(zs) if zs and None not in zs else float("-inf"))


def out_of_step(null: dict, voices: str, max_unsynced: float, min_offset: float, min_offset_s: float) -> np.ndarray:
    """Where the stage's out-of-step rule fires on the null's `other` or `shifted` curves: no in-step
    evidence, a peak of at least `min_offset` at least `min_offset_s` from lag 0 (and, for shifted
    voices, at their shift: `shifted_peak` is -inf elsewhere)."""
    score, peak = np.array(null[voices]), np.array(null[f"{voices}_peak"])
    lag = np.nan_to_num(np.abs(np.array(null[f"{voices}_lag"])), nan=0.0)
    return (score < max_unsynced) & (peak >= min_offset) & (lag >= min_offset_s)


def operating_point(null: dict, spreads: dict, false_alarm: float, min_offset_s: float) -> dict:
    """Thresholds at the false-alarm rate asked for (rounded up to 0.1); the band below the
    in-step threshold is as wide as the largest in-step score spread of moving lips across
    encodings, so a clip out of step in one encoding is not in step in another. The out-of-step
    threshold is the lowest at which the stage's whole out-of-step rule (`out_of_step`) fires on
    at most that share of other voices' curves."""
    up = (lambda v: float(np.ceil(v * 10 - 1e-6) / 10))
    negatives = np.array(null["shifted"] + null["other"])
    min_sync = up(np.quantile(negatives, 1 - false_alarm, method="higher"))
    band = max(spreads["moving_sync"].values(), default=0.0)
    max_unsynced = round(min_sync - up(band), 1)
    offset = next(round(z, 1) for z in np.arange(2.0, 10.0, 0.1)
                  if np.mean(out_of_step(null, "other", max_unsynced, z, min_offset_s)) <= false_alarm)
    return {"min_sync_score": min_sync, "max_unsynced_score": max_unsynced, "min_offset_score": offset}


def own_by_length(null: dict) -> None:
    """Own voices' in-step score by speech length: how low a flat lag curve would have to be to say
    a moving mouth is not the voice (the stage does not use it: see docs/speech.md, Limits)."""
    own, length = np.array(null["own"]), np.array(null["own_speech_s"])
    for lo, hi in ((3.0, 4.5), (4.5, 5.5), (5.5, np.inf)):
        print(describe(f"in-step, own voice, {lo:g}-{hi:g} s speech", own[(length >= lo) & (length < hi)]))


def offset_tradeoff(null: dict, p: SpeechDisambiguationParams) -> None:
    """What each out-of-step peak threshold buys: false peaks among other voices' curves (the stand-in
    for a talking face whose sync cannot be measured, where a peak would be a false `voice_over`)
    against own voices 1 s late found at their lag (longer shifts leave short windows little overlap);
    the peak alone, then the stage's whole rule (in-step score under max_unsynced_score, the peak at
    least min_offset_s from 0)."""
    other = np.array(null["other_peak"])
    first = np.array(null["shifted_by"]) == SHIFTS_S[0]
    late = np.array(null["shifted_peak"])[first]
    print(f"  out-of-step peak threshold: false peaks of {len(other)} other voices / voices {SHIFTS_S[0]:g} s late "
          f"found of {len(late)}; peak alone | the stage's rule (max_unsynced_score {p.max_unsynced_score}, "
          f"min_offset_s {p.min_offset_s})")
    for z in np.arange(3.2, 4.45, 0.3):
        rule_other = out_of_step(null, "other", p.max_unsynced_score, z, p.min_offset_s)
        rule_late = out_of_step(null, "shifted", p.max_unsynced_score, z, p.min_offset_s)[first]
        print(f"    z >= {z:.1f}: {np.mean(other >= z):5.1%} / {np.mean(late >= z):4.0%}   |   "
              f"{np.mean(rule_other):5.1%} / {np.mean(rule_late):4.0%}")
    other_bands = np.array(null["other_bands"])
    late_bands = np.array(null["shifted_bands"])[first]
    halves = (np.array(null["other_halves"]), np.array(null["shifted_halves"])[first])
    print(f"  the same, with both halves of the window peaking within {HALF_AGREE_S:g} s of that peak:")
    for z in (2.6, 3.0, 3.4, 3.8):
        print(f"    z >= {z:.1f}: {np.mean((other >= z) & halves[0]):5.1%} / {np.mean((late >= z) & halves[1]):4.0%}")
    print("  the same, with every band's own curve at z >= b at that peak (a true offset is one lag in every band):")
    for z, b in ((3.8, 2.4), (3.6, 2.6), (3.4, 2.8), (3.0, 2.8), (0.0, 2.7), (0.0, 2.8), (0.0, 2.9)):
        print(f"    z >= {z:.1f}, b >= {b:.1f}: {np.mean((other >= z) & (other_bands >= b)):5.1%} / "
              f"{np.mean((late >= z) & (late_bands >= b)):4.0%}")


def describe(name: str, values) -> str:
    v = np.sort(np.asarray([x for x in values if np.isfinite(x)], dtype=float))
    if not len(v):
        return f"  {name:<34} (none)"
    q = np.quantile(v, [0.05, 0.5, 0.95])
    return (f"  {name:<34} n={len(v):<4} min {v[0]:5.2f}  p5 {q[0]:5.2f}  median {q[1]:5.2f}  p95 {q[2]:5.2f}"
            f"  max {v[-1]:5.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="lafid180k")
    ap.add_argument("--false-alarm", type=float, default=0.005, help="false-alarm rate of the operating point")
    ap.add_argument("--lip-detector", choices=["mesh", "vvad"], help="override the recipe's lip_detector")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="override one of the recipe's speech parameters (YAML value), e.g. mouth_margin_s=0")
    ap.add_argument("--excerpt-s", type=float, default=3.0, help="also judge each clip's first seconds (0: no)")
    ap.add_argument("--json", help="also write the per-clip rows here")
    args = ap.parse_args()

    params = speech_params(args.recipe)
    if args.lip_detector:
        params["lip_detector"] = args.lip_detector
    for name, _, value in (item.partition("=") for item in args.param):
        params[name] = yaml.safe_load(value)
    rows, stage_cpu, mouth_cpu, speech_s = judge_all(params, args.excerpt_s)

    num = (lambda v, f: "-" if v is None else f.format(v))
    fmt = "{:<30} {:<8} {:<10} {:<10} {:>6} {:>6} {:>6} {:>6} {:>6} {:>5}  {}"
    print(fmt.format("clip", "encoding", "expected", "label", "sync", "lag", "peak", "p.lag", "lips", "vvad", "ok"))
    for r in rows:
        c = r["columns"]
        print(fmt.format(r["clip"][:30], r["encoding"], r["expected"], str(r["label"]), num(c.get("av_sync"), "{:.2f}"),
                         num(c.get("av_lag_s"), "{:+.2f}"), num(c.get("av_peak_z"), "{:.2f}"),
                         num(c.get("av_peak_lag_s"), "{:+.2f}"), num(c.get("lip_activity"), "{:.3f}"),
                         num(c.get("visual_speaking"), "{:.2f}"),
                         "yes" if r["label"] in r["accepted"] else ("NO" if r["label"] in CONFIDENT else "unc")))
    print()
    detector = params.get("lip_detector", "mesh")
    print_figures(f"labels ({args.recipe}, {detector})", label_figures(rows, lambda r: r["label"]))

    stage = SpeechDisambiguationParams(**params)
    spreads = spread(rows, stage)
    print("\nlargest spread of a score across one clip's encodings (max - min)")
    for key, ranges in spreads.items():
        worst = sorted(ranges.items(), key=lambda kv: -kv[1])[:3]
        print(f"  {key:<13} " + ", ".join(f"{c} {v:.2f}" for c, v in worst))
    print("\nlip activity by expected label (all encodings)")
    for lab in sorted({r["expected"] for r in rows}):
        vals = [r["columns"].get("lip_activity") for r in rows if r["expected"] == lab]
        print(describe(lab, [v for v in vals if v is not None]))

    null = null_distribution(rows, stage)
    print(f"\nnull distribution (speaking clips x encodings x windows with >= {stage.min_sync_speech_s} s of speech)")
    print(describe("in-step score, own voice", null["own"]))
    print(describe("in-step score, own voice shifted", null["shifted"]))
    print(describe("in-step score, another voice", null["other"]))
    print(describe("out-of-step peak, own voice shifted", null["shifted_peak"]))
    print(describe("out-of-step peak, another voice", null["other_peak"]))
    own_by_length(null)
    point = operating_point(null, spreads, args.false_alarm, stage.min_offset_s)
    negatives = np.array(null["shifted"] + null["other"])
    print(f"\noperating point at false alarm {args.false_alarm:.1%}: {point}")
    print(f"  recipe has: min_sync_score {stage.min_sync_score}, max_unsynced_score {stage.max_unsynced_score}, "
          f"min_offset_score {stage.min_offset_score}")
    own = np.array(null["own"])
    print(f"  at the recipe's min_sync_score: false alarms {np.mean(negatives >= stage.min_sync_score):.1%} of "
          f"{len(negatives)} negatives, own voices found {np.mean(own >= stage.min_sync_score):.0%} of {len(own)}")
    fired = [out_of_step(null, v, stage.max_unsynced_score, stage.min_offset_score, stage.min_offset_s)
             for v in ("other", "shifted")]
    print(f"  at the recipe's out-of-step rule: false voice-overs {np.mean(fired[0]):.1%} of {len(fired[0])} other "
          f"voices, shifted voices found at their shift {np.mean(fired[1]):.0%} of {len(fired[1])}")
    offset_tradeoff(null, stage)
    replay = SpeechDisambiguationParams(**{**params, **point})
    print_figures("replayed at the operating point", label_figures(
        rows, lambda r: r["label"] if r["label"] == "no_audio" else decide(r["columns"], replay)))
    print(f"\nspeech-seconds {speech_s:.1f}; stage CPU-s per speech-second (no ASR): {stage_cpu / speech_s:.3f}, "
          f"of which the mouth pass {mouth_cpu / speech_s:.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{k: v for k, v in r.items() if k not in ("series", "columns")} for r in rows], fh, indent=1)


if __name__ == "__main__":
    main()
