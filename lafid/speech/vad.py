"""Silero VAD (the ONNX model shipped inside faster-whisper) with pinned threads.

faster-whisper's own `get_speech_timestamps` always uses a cached one-thread
session; here the session gets the threads the stage asked for, and the
speech/silence hysteresis is exposed so the recipe can set it.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from faster_whisper.utils import get_assets_path
from faster_whisper.vad import SileroVADModel

from lafid.speech.audio import RATE

WINDOW = 512  # samples per Silero decision (32 ms at 16 kHz)


class _PinnedSilero(SileroVADModel):
    """SileroVADModel whose session uses `threads` intra-op threads."""

    def __init__(self, threads: int):  # replaces the parent's hard-coded single-thread session
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 4
        path = os.path.join(get_assets_path(), "silero_vad_v6.onnx")
        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"], sess_options=opts)


class SileroVAD:
    def __init__(self, threads: int = 1, threshold: float = 0.5, min_speech_s: float = 0.25,
                 min_silence_s: float = 0.3, pad_s: float = 0.1):
        self.model = _PinnedSilero(threads)
        self.threshold = threshold
        self.neg_threshold = max(threshold - 0.15, 0.01)
        self.min_speech_s = min_speech_s
        self.min_silence_s = min_silence_s
        self.pad_s = pad_s

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability per 32 ms window."""
        if len(audio) == 0:
            return np.zeros(0, np.float32)
        padded = np.pad(audio.astype(np.float32), (0, -len(audio) % WINDOW))
        return np.asarray(self.model(padded)).reshape(-1)

    def segments(self, audio: np.ndarray) -> list[tuple[float, float]]:
        """Speech segments (start, end) in seconds: hysteresis, short-gap merge, padding."""
        step = WINDOW / RATE
        raw, start, last_speech = [], None, 0.0
        for i, p in enumerate(self.probabilities(audio)):
            t = i * step
            if p >= self.threshold:
                if start is None:
                    start = t
                last_speech = t + step
            elif start is not None and p < self.neg_threshold and t - last_speech >= self.min_silence_s:
                raw.append((start, last_speech))
                start = None
        if start is not None:
            raw.append((start, last_speech))
        return around([(s, e) for s, e in raw if e - s >= self.min_speech_s], self.pad_s, len(audio) / RATE)


def around(segments, margin_s: float, duration_s: float) -> list[tuple[float, float]]:
    """`segments` (seconds) widened by `margin_s` on each side within 0..`duration_s`, overlaps merged:
    the VAD's padding, and the mouth pass's margin around speech."""
    out: list[tuple[float, float]] = []
    for s, e in sorted(segments):
        s, e = max(0.0, s - margin_s), min(duration_s, e + margin_s)
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > s:
            out.append((s, e))
    return out


def within(t: np.ndarray, segments) -> np.ndarray:
    """Which of the times `t` lie inside one of `segments`."""
    t = np.asarray(t, dtype=np.float64)
    inside = np.zeros(len(t), dtype=bool)
    for s, e in segments:
        inside |= (t >= s) & (t < e)
    return inside
