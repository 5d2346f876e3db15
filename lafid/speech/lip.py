"""Lip activity from the mouth openings Face Constraints already measured.

The signal is `frame_mouth_open` (inner-lip gap over face height, scale-free)
at the sampled times `frame_t`; no frame is decoded again. Motion energy is
the mean absolute change of that opening per second, over consecutive frames
that both have a face, so a still face scores near zero whatever its shape.
"""

from __future__ import annotations

import numpy as np


def lip_series(frame_t, mouth_open) -> tuple[np.ndarray, np.ndarray]:
    """Times and mouth openings as float arrays (NaN where no face was measured)."""
    t = np.asarray(frame_t if frame_t is not None else [], dtype=np.float64)
    m = np.asarray(mouth_open if mouth_open is not None else [], dtype=np.float64)
    return t, m


def lip_activity(t: np.ndarray, m: np.ndarray) -> float | None:
    """Mean |d(mouth opening)/dt| over consecutive measured frames, per second."""
    if len(t) < 2:
        return None
    dt, dm = np.diff(t), np.diff(m)
    ok = ~np.isnan(dm) & (dt > 0)
    if not ok.any():
        return None
    return float(np.mean(np.abs(dm[ok]) / dt[ok]))
