"""Audio-visual agreement: does the speech's loudness follow the visible mouth?

Inside the VAD speech segments, the mouth opening per sampled frame is
correlated (Pearson) with the speech envelope (RMS loudness over one frame
period around the same instant). The envelope is sampled at the frame times
shifted by each lag in a small search window, because encoders and cameras
offset audio by a few tens of milliseconds. The best correlation is the sync
score; a mouth that moves independently of the voice scores near zero.
"""

from __future__ import annotations

import numpy as np

from lafid.speech.audio import RATE


def speech_envelope(audio: np.ndarray, times: np.ndarray, window_s: float) -> np.ndarray:
    """RMS loudness of `audio` in a `window_s` window centred on each time."""
    power = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    half = max(1, int(window_s * RATE / 2))
    centre = np.round(times * RATE).astype(int)
    lo = np.clip(centre - half, 0, len(audio))
    hi = np.clip(centre + half, 0, len(audio))
    n = np.maximum(hi - lo, 1)
    return np.sqrt((power[hi] - power[lo]) / n)


def in_segments(t: np.ndarray, segments: list[tuple[float, float]]) -> np.ndarray:
    mask = np.zeros(len(t), dtype=bool)
    for s, e in segments:
        mask |= (t >= s) & (t < e)
    return mask


def av_sync(t: np.ndarray, mouth: np.ndarray, audio: np.ndarray, segments: list[tuple[float, float]],
            max_lag_s: float = 0.2, lag_step_s: float = 0.02, min_frames: int = 8) -> tuple[float | None, float | None]:
    """(best correlation, its lag in seconds; positive = audio later) or (None, None).

    None when fewer than `min_frames` measured frames fall inside speech, or
    when either signal is flat there (a correlation would be meaningless).
    """
    mask = in_segments(t, segments) & ~np.isnan(mouth)
    if mask.sum() < min_frames:
        return None, None
    tm, mm = t[mask], mouth[mask]
    if np.std(mm) == 0:
        return None, None
    window = float(np.median(np.diff(t))) if len(t) > 1 else 0.1
    best: tuple[float, float] | None = None
    for lag in np.arange(-max_lag_s, max_lag_s + 1e-9, lag_step_s):
        env = speech_envelope(audio, tm + lag, window)
        if np.std(env) == 0:
            continue
        r = float(np.corrcoef(mm, env)[0, 1])
        if best is None or r > best[0]:
            best = (r, float(lag))
    return best if best is not None else (None, None)
