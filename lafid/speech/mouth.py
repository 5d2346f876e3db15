"""Mouth opening at the video's own frame rate, inside speech only.

The face stage samples a few frames per second for pose; syllables come at
4-7 per second, so lip-voice agreement needs every frame. This pass decodes
only the frames inside the speech segments, crops the subject's face where the
face stage tracked it (its `frame_box`, interpolated in time, so no detector
runs and no other face is picked up), and fits the face mesh on that small crop.
"""

from __future__ import annotations

import numpy as np

from lafid.face.detect import square_crop
from lafid.face.pose import mouth_opening
from lafid.video import sample_frames

CROP_SIZE = 192  # the face mesh's own input size
CROP_MARGIN = 1.5  # crop side over the face box's long side
MAX_BOX_GAP_S = 0.3  # no crop where the tracked box is further than this from a measured frame


def box_at(t: np.ndarray, frame_t, frame_box) -> np.ndarray:
    """The tracked face box (normalised x0, y0, x1, y1) at times `t`; NaN rows where unknown."""
    out = np.full((len(t), 4), np.nan)
    known = [(ft, b) for ft, b in zip(frame_t or [], frame_box or []) if b is not None]
    if not known:
        return out
    kt = np.array([k[0] for k in known], dtype=np.float64)
    kb = np.array([k[1] for k in known], dtype=np.float64)
    for j in range(4):
        out[:, j] = np.interp(t, kt, kb[:, j])
    gap = np.min(np.abs(t[:, None] - kt[None, :]), axis=1)
    out[gap > MAX_BOX_GAP_S] = np.nan
    return out


class MouthTracker:
    """Face mesh on the subject's crop, frame by frame, in tracking mode within a segment."""

    def __init__(self, min_confidence: float = 0.5):
        import mediapipe as mp

        self._face_mesh = mp.solutions.face_mesh
        self.min_confidence = min_confidence

    def series(self, source: str, start_s: float, windows: list[tuple[float, float]],
               frame_t, frame_box, fps: float) -> tuple[np.ndarray, np.ndarray]:
        """(times from clip start, mouth opening or NaN) for every frame inside `windows`."""
        times: list[float] = []
        opening: list[float] = []
        for w0, w1 in windows:
            with self._face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=False,
                                          min_detection_confidence=self.min_confidence,
                                          min_tracking_confidence=self.min_confidence) as mesh:
                for t, frame in sample_frames(source, start_s + w0, start_s + w1, fps):
                    t = w0 + t
                    box = box_at(np.array([t]), frame_t, frame_box)[0]
                    times.append(t)
                    opening.append(self._opening(mesh, frame, box))
        return np.asarray(times, dtype=np.float64), np.asarray(opening, dtype=np.float64)

    @staticmethod
    def _opening(mesh, frame: np.ndarray, box: np.ndarray) -> float:
        if np.isnan(box).any():
            return float("nan")
        h, w = frame.shape[:2]
        crop, _ = square_crop(frame, box * np.array([w, h, w, h]), CROP_SIZE, CROP_MARGIN)
        found = mesh.process(crop).multi_face_landmarks
        if not found:
            return float("nan")
        pts = np.array([(lm.x * CROP_SIZE, lm.y * CROP_SIZE) for lm in found[0].landmark], dtype=np.float32)
        return mouth_opening(pts)
