"""Audio-visual agreement: does the voice follow the visible mouth?

Two signals, both high-passed (1 s moving average removed, so slow changes such
as a smile or a louder room do not count) and differentiated (so what is
compared is movement: the mouth opening or closing, the voice starting or
stopping a syllable):
- the mouth opening measured at the video's own frame rate inside speech;
- the articulation envelope: log energy of the 300-3000 Hz band (where vowel
  formants and consonant bursts live), in 40 ms windows every 10 ms.

Their correlation is computed at every lag from -2 s to +2 s. A raw correlation
means little on its own (short clips and rhythmic speech make large chance
values), so, in the spirit of SyncNet's offset confidence, the score is how far
the best correlation within `max_lag_s` stands above the correlations at far
lags (0.6-2 s) of the same clip, in units of their spread: a z-score that means
the same on every face, microphone and clip length. A speaker's own voice peaks
near lag 0; someone else's voice, or the same voice shifted by a second, does
not stand out there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d
from scipy.signal import butter, sosfiltfilt

from lafid.speech.audio import RATE

BAND_HZ = (300.0, 3000.0)
HOP_S = 0.01  # envelope step
WINDOW_S = 0.04  # envelope window
HIGHPASS_S = 1.0  # moving-average length removed from both signals
SMOOTH_S = 0.05  # smoothing before differentiating
FAR_LAGS_S = (0.6, 2.0)  # lags whose correlations form the chance baseline
LAG_STEP_S = 0.02
_BAND = butter(4, BAND_HZ, btype="band", fs=RATE, output="sos")


@dataclass(frozen=True)
class SyncResult:
    score: float  # z-score of the best near-lag correlation against the far lags
    lag_s: float  # lag of that correlation; positive = audio later than the lips
    r: float  # the correlation itself
    frames: int  # mouth measurements that entered the correlation


def articulation_envelope(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(times, log band energy) every HOP_S seconds."""
    if len(audio) < 64:
        return np.zeros(0), np.zeros(0)
    band = sosfiltfilt(_BAND, audio.astype(np.float64))
    power = np.concatenate([[0.0], np.cumsum(band ** 2)])
    n = int(len(audio) / RATE / HOP_S)
    centre = (np.arange(n) * HOP_S * RATE).astype(int)
    half = int(WINDOW_S * RATE / 2)
    lo, hi = np.clip(centre - half, 0, len(band)), np.clip(centre + half, 0, len(band))
    energy = (power[hi] - power[lo]) / np.maximum(hi - lo, 1)
    return np.arange(n) * HOP_S, np.log(energy + 1e-8)


def movement(x: np.ndarray, rate: float) -> np.ndarray:
    """High-passed, smoothed derivative of a signal sampled at `rate` per second."""
    x = x - uniform_filter1d(x, max(1, int(round(HIGHPASS_S * rate))), mode="nearest")
    x = uniform_filter1d(x, max(1, int(round(SMOOTH_S * rate))), mode="nearest")
    return np.gradient(x) if len(x) > 1 else np.zeros_like(x)


def mouth_movement(t: np.ndarray, mouth: np.ndarray, max_gap: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Mouth movement per run of consecutive frames (a speech window), gaps of up to
    `max_gap` missing frames interpolated; runs with longer gaps are split there."""
    if len(t) < 2:
        return np.zeros(0), np.zeros(0)
    step = float(np.median(np.diff(t)))
    times, values = [], []
    for run in np.split(np.arange(len(t)), np.nonzero(np.diff(t) > 1.5 * step)[0] + 1):
        rt, rm = t[run], mouth[run].copy()
        ok = ~np.isnan(rm)
        if ok.sum() < 2:
            continue
        rm[~ok] = np.interp(rt[~ok], rt[ok], rm[ok])
        gap = _gap_length(ok)
        keep = gap <= max_gap
        mv = movement(rm, 1.0 / step)
        times.append(rt[keep])
        values.append(mv[keep])
    if not times:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(times), np.concatenate(values)


def _gap_length(ok: np.ndarray) -> np.ndarray:
    """For each sample, the length of the missing run it belongs to (0 if measured)."""
    out = np.zeros(len(ok), dtype=int)
    i = 0
    while i < len(ok):
        if ok[i]:
            i += 1
            continue
        j = i
        while j < len(ok) and not ok[j]:
            j += 1
        out[i:j] = j - i
        i = j
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def av_sync(t: np.ndarray, mouth: np.ndarray, audio: np.ndarray, max_lag_s: float = 0.15,
            min_frames: int = 25) -> SyncResult | None:
    """Sync of the mouth series (times from clip start) with the clip's audio, or None
    when fewer than `min_frames` usable mouth measurements exist or a signal is flat."""
    mt, mv = mouth_movement(np.asarray(t, np.float64), np.asarray(mouth, np.float64))
    if len(mt) < min_frames or not np.any(mv):
        return None
    et, env = articulation_envelope(audio)
    if len(et) < 2:
        return None
    ev = movement(env, 1.0 / HOP_S)
    lags, rs = [], []
    for lag in np.arange(-FAR_LAGS_S[1], FAR_LAGS_S[1] + 1e-9, LAG_STEP_S):
        shifted = mt + lag
        inside = (shifted >= et[0]) & (shifted <= et[-1])
        if inside.sum() < max(min_frames, len(mt) // 2):
            continue  # too little overlap at this lag to compare
        r = _corr(mv[inside], np.interp(shifted[inside], et, ev))
        if not np.isnan(r):
            lags.append(lag)
            rs.append(r)
    lags_a, rs_a = np.array(lags), np.array(rs)
    near = np.abs(lags_a) <= max_lag_s + 1e-9
    far = np.abs(lags_a) >= FAR_LAGS_S[0] - 1e-9
    if not near.any() or far.sum() < 5:
        return None
    best = int(np.argmax(np.where(near, rs_a, -np.inf)))
    baseline = rs_a[far]
    score = (rs_a[best] - baseline.mean()) / max(baseline.std(), 1e-6)
    return SyncResult(score=float(score), lag_s=float(round(lags_a[best], 3)), r=float(rs_a[best]), frames=len(mt))
