"""Audio-visual agreement: does the voice follow the visible mouth?

Two signals, both high-passed (1 s moving average removed, so slow changes such
as a smile or a louder room do not count) and differentiated (so what is
compared is movement: the lips opening or closing, the voice starting or
stopping a syllable):
- the outer-lip height over mouth width (`lafid.speech.mouth`), measured at the
  video's own frame rate inside speech and a margin around it (so a voice late
  by up to that margin is compared with the lips that made it): the outer lip
  contour survives compression better than the thin inner-lip gap;
- the articulation envelope: log energy of three bands between 300 and
  3000 Hz (where vowel formants and consonant bursts live: first formant,
  second formant, bursts and fricative onsets), in 40 ms windows every 10 ms.

Their correlation is computed at every lag from -3 s to +3 s, once per band,
and the three are averaged (the lag curve): the bands move with different
parts of articulation, so their chance agreements partly cancel while the true
lag adds up (own voices found 77 % of the null's windows instead of 63 % with
one 300-3000 Hz band, at the same 1 % false alarms; benchmarks/speech_labels.py).
A raw correlation means little on its own (short clips and rhythmic speech make
large chance values), so, in the spirit of SyncNet's offset confidence, two
z-scores are read off the curve of the same clip:
- `score`: the best correlation within `max_lag_s` against the far lags
  (0.6-3 s): evidence that the lips are in step with the voice;
- `peak_score`: the curve's highest point against the rest of the curve (lags
  more than PEAK_WIDTH_S away from it): evidence of one clear offset; reported
  only when that point is not at the end of the lags the clip allows, where
  the true peak may lie outside.
A speaker's own voice peaks near lag 0; the same voice shifted by a second peaks
at that second; someone else's voice peaks nowhere. How high chance goes is
measured, not assumed (benchmarks/speech_labels.py builds the null).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import uniform_filter1d
from scipy.signal import butter, sosfiltfilt

from lafid.speech.audio import RATE

BANDS_HZ = ((300.0, 800.0), (800.0, 1600.0), (1600.0, 3000.0))
HOP_S = 0.01  # envelope step
WINDOW_S = 0.04  # envelope window
HIGHPASS_S = 1.0  # moving-average length removed from both signals
SMOOTH_S = 0.05  # smoothing before differentiating
FAR_LAGS_S = (0.6, 3.0)  # lags whose correlations form the chance baseline; the curve spans +-FAR_LAGS_S[1]
PEAK_WIDTH_S = 0.3  # lags this close to a peak belong to it, not to the baseline
LAG_STEP_S = 0.02
_BANDS = [butter(4, band, btype="band", fs=RATE, output="sos") for band in BANDS_HZ]


@dataclass(frozen=True)
class SyncResult:
    score: float  # z-score of the best near-lag correlation against the far lags
    lag_s: float  # lag of that correlation; positive = audio later than the lips
    r: float  # the correlation itself
    frames: int  # mouth measurements that entered the correlation
    peak_score: float | None = None  # z-score of the curve's highest point against the rest; None at the edge
    peak_lag_s: float | None = None  # lag of that point


def articulation_envelope(audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(times, log band energy per band: shape (times, len(BANDS_HZ))) every HOP_S seconds."""
    if len(audio) < 64:
        return np.zeros(0), np.zeros((0, len(BANDS_HZ)))
    n = int(len(audio) / RATE / HOP_S)
    centre = (np.arange(n) * HOP_S * RATE).astype(int)
    half = int(WINDOW_S * RATE / 2)
    lo, hi = np.clip(centre - half, 0, len(audio)), np.clip(centre + half, 0, len(audio))
    audio = audio.astype(np.float64)
    out = np.empty((n, len(_BANDS)))
    for j, sos in enumerate(_BANDS):
        power = np.concatenate([[0.0], np.cumsum(sosfiltfilt(sos, audio) ** 2)])
        out[:, j] = np.log((power[hi] - power[lo]) / np.maximum(hi - lo, 1) + 1e-8)
    return np.arange(n) * HOP_S, out


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


def lag_curve(t: np.ndarray, mouth: np.ndarray, audio: np.ndarray, min_frames: int = 25,
              per_band: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """(lags, correlations) of mouth movement against the voice's, averaged over the bands (or one
    column per band with `per_band`), or None when fewer than `min_frames` usable mouth
    measurements exist or a signal is flat."""
    mt, mv = mouth_movement(np.asarray(t, np.float64), np.asarray(mouth, np.float64))
    if len(mt) < min_frames or not np.any(mv):
        return None
    et, env = articulation_envelope(audio)
    if len(et) < 2:
        return None
    evs = [movement(env[:, j], 1.0 / HOP_S) for j in range(env.shape[1])]
    lags, rs = [], []
    for lag in np.arange(-FAR_LAGS_S[1], FAR_LAGS_S[1] + 1e-9, LAG_STEP_S):
        shifted = mt + lag
        inside = (shifted >= et[0]) & (shifted <= et[-1])
        if inside.sum() < max(min_frames, len(mt) // 2):
            continue  # too little overlap at this lag to compare
        r = [_corr(mv[inside], np.interp(shifted[inside], et, ev)) for ev in evs]
        if not np.isnan(np.mean(r)):
            lags.append(round(float(lag), 3))
            rs.append(r if per_band else float(np.mean(r)))
    return np.array(lags), np.array(rs)


def z_at(lags: np.ndarray, rs: np.ndarray, lag: float) -> float | None:
    """z-score of the curve at `lag` against its lags more than PEAK_WIDTH_S away; None when
    fewer than 5 such lags exist."""
    rest = rs[np.abs(lags - lag) > PEAK_WIDTH_S]
    if len(rest) < 5:
        return None
    return float((rs[int(np.argmin(np.abs(lags - lag)))] - rest.mean()) / max(rest.std(), 1e-6))


def score_curve(lags: np.ndarray, rs: np.ndarray, max_lag_s: float, frames: int = 0) -> SyncResult | None:
    """Both z-scores of a lag curve (module docstring); None when it has too few far lags."""
    near = np.abs(lags) <= max_lag_s + 1e-9
    far = np.abs(lags) >= FAR_LAGS_S[0] - 1e-9
    if not near.any() or far.sum() < 5:
        return None
    best = int(np.argmax(np.where(near, rs, -np.inf)))
    baseline = rs[far]
    score = (rs[best] - baseline.mean()) / max(baseline.std(), 1e-6)
    top = int(np.argmax(rs))
    peak_score = peak_lag = None
    if 0 < top < len(lags) - 1:  # a maximum at the curve's end is no peak
        peak_score = z_at(lags, rs, float(lags[top]))
        peak_lag = None if peak_score is None else float(lags[top])
    return SyncResult(score=float(score), lag_s=float(lags[best]), r=float(rs[best]), frames=frames,
                      peak_score=peak_score, peak_lag_s=peak_lag)


def av_sync(t: np.ndarray, mouth: np.ndarray, audio: np.ndarray, max_lag_s: float = 0.2,
            min_frames: int = 25) -> SyncResult | None:
    """Sync of the mouth series (times from clip start) with the clip's audio, or None
    when it cannot be measured (too few mouth frames, a flat signal, too short a clip)."""
    curve = lag_curve(t, mouth, audio, min_frames)
    if curve is None:
        return None
    return score_curve(*curve, max_lag_s, frames=int(np.isfinite(np.asarray(mouth, float)).sum()))
