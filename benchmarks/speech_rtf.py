"""Real-time factors of the Speech Disambiguation parts on this machine.

RTF = processing seconds / audio (or video) seconds; below 1 is faster than
real time. Measured on one long clip of espeak-ng speech with pauses and long
silences (a talk-show-like duty cycle, set by --speech-share), written as AAC
and read back through the stage's own audio extraction:
- audio extraction (PyAV decode + resample to 16 kHz mono)
- Silero VAD, and the share of clip audio it sends to ASR
- ASR per model directory and compute type (int8, float32), on VAD speech only,
  with the word error rate against the spoken text
- lip activity + audio-visual sync on carphone's mouth track, and the Face
  Constraints pass at the speech analysis rate that feeds them

    python benchmarks/speech_rtf.py [--seconds 60] [--threads 2] [--model-dir DIR ...]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jiwer
import numpy as np

from lafid import media
from lafid.item import Item
from lafid.speech.asr import FasterWhisperASR, embedded_whisper_dir
from lafid.speech.audio import RATE, extract_audio
from lafid.speech.lip import lip_activity
from lafid.speech.sync import av_sync
from lafid.speech.vad import SileroVAD
from lafid.stage import StageWorker, pin_native_threads
from lafid.video import content_id
from lafid.stages.face_constraints import FaceConstraints

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "She sells sea shells by the sea shore every summer.",
    "A large rainbow appeared in the sky after the storm had passed.",
    "Please remember to close the window before you leave the house.",
]


def program(seconds: float, speech_share: float) -> tuple[np.ndarray, str]:
    """Sentences separated by silences sized so speech fills about `speech_share` of the clip."""
    spoken = [media.speak(s) for s in SENTENCES]
    mean_len = np.mean([len(s) for s in spoken]) / RATE
    gap = mean_len * (1 - speech_share) / speech_share
    parts, words, i = [], [], 0
    while sum(len(p) for p in parts) / RATE < seconds:
        parts += [np.zeros(int(gap * RATE), np.float32), spoken[i % len(spoken)]]
        words.append(SENTENCES[i % len(SENTENCES)])
        i += 1
    audio = np.concatenate(parts)[: int(seconds * RATE)]
    kept = [w for w, end in zip(words, np.cumsum([len(p) for p in parts])[1::2]) if end <= len(audio)]
    return audio, " ".join(kept)


def timed(fn, *args, repeat: int = 1):
    """Best wall time of `repeat` runs (the first run also warms caches), and the result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - start)
    return best, out


def wer(reference: str, hypothesis: str) -> float:
    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return jiwer.wer(reference, hypothesis, reference_transform=norm, hypothesis_transform=norm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--speech-share", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-dir", action="append", default=[], help="extra CTranslate2 Whisper dirs")
    ap.add_argument("--compute-type", action="append", default=None, help="default: int8 and float32")
    ap.add_argument("--lip-fps", type=float, default=15.0)
    args = ap.parse_args()
    pin_native_threads(args.threads)
    rows = []

    def report(part: str, seconds: float, media_s: float, **extra) -> None:
        row = {"part": part, "seconds": round(seconds, 4), "media_s": round(media_s, 2),
               "rtf": round(seconds / media_s, 5), **extra}
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        source, text = program(args.seconds, args.speech_share)
        path = media.write_audio_only(os.path.join(tmp, "program.m4a"), source)
        took, clip = timed(extract_audio, path, 0.0, args.seconds, repeat=3)
        audio = clip.samples
        report("audio_extract", took, args.seconds)

        vad = SileroVAD(threads=args.threads, pad_s=0.3)
        took, segments = timed(vad.segments, audio, repeat=3)
        speech_s = sum(e - s for s, e in segments)
        report("vad", took, args.seconds, segments=len(segments), asr_share=round(speech_s / args.seconds, 3))

        took, model_dir = timed(embedded_whisper_dir)
        print(json.dumps({"part": "embedded_model_ready", "seconds": round(took, 3), "dir": str(model_dir)}))
        for directory in [str(model_dir), *args.model_dir]:
            for compute in args.compute_type or ["int8", "float32"]:
                load_s, asr = timed(FasterWhisperASR, directory, compute, args.threads)
                took, result = timed(asr.transcribe, audio, segments)
                report("asr", took, args.seconds, model=os.path.basename(directory.rstrip("/")),
                       compute_type=compute, load_s=round(load_s, 2), rtf_of_speech=round(took / speech_s, 4),
                       wer=round(wer(text, result.text), 3))
                asr.close()

        frames = media.carphone_frames()
        video = media.write_video(os.path.join(tmp, "talk.mp4"), frames + frames[::-1], 29.97,
                                  audio=source[: int(8 * RATE)])
        faces = StageWorker(FaceConstraints({"sample_fps": args.lip_fps}))
        item = Item(source=video, video_id=content_id(video), clip_index=0, start_s=0.0, end_s=8.0)
        took, (out, _) = timed(faces.run, [item])
        faces.close()
        report("face_constraints_at_lip_fps", took, 8.0, sample_fps=args.lip_fps)
        c = out[0].columns
        t, mouth = np.asarray(c["frame_t"]), np.asarray(c["frame_mouth_open"], dtype=float)
        clip8 = extract_audio(video, 0.0, 8.0).samples
        seg8 = vad.segments(clip8)
        took, _ = timed(lambda: (lip_activity(t, mouth), av_sync(t, mouth, clip8)), repeat=5)
        report("lip_activity_and_sync", took, 8.0, frames=len(t))

    print("\npart                          RTF       notes")
    for r in rows:
        notes = {k: v for k, v in r.items() if k not in ("part", "seconds", "media_s", "rtf")}
        print(f"{r['part']:<29} {r['rtf']:<9} {notes}")


if __name__ == "__main__":
    main()
