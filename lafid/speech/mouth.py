"""Mouth opening at the video's own frame rate, around speech only.

The face stage samples a few frames per second for pose; syllables come at
4-7 per second, so lip-voice agreement needs every frame. This pass decodes
only the frames inside the speech segments and a margin around them
(`lafid.speech.vad.around`: a voice that is late or early by up to that margin
still meets the lips that made it, so its out-of-step peak can be seen), crops
the subject's face where the face stage tracked it (its `frame_box`, interpolated in time, so no detector
runs and no other face is picked up), and fits the face mesh on that small crop.
Two openings are kept: the inner-lip gap over face height (the face stage's
measure) and the outer-lip height over mouth width, which the sync measure
uses because the outer contour survives compression better than the thin gap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lafid.face.detect import square_crop
from lafid.face.pose import mouth_opening
from lafid.video import sample_frames

# The 20 lip points of the dlib 68-point layout (48..67: outer lip from the image-left
# corner, then inner lip) in the face mesh; learned lip models take them in this order.
LIP_POINTS = (61, 40, 37, 0, 267, 270, 291, 321, 314, 17, 84, 91, 78, 81, 13, 311, 308, 402, 14, 178)
_OUTER_TOP, _OUTER_BOTTOM, _LEFT, _RIGHT = 3, 9, 0, 6  # positions in LIP_POINTS: mesh 0, 17, 61, 291
CROP_SIZE = 192  # the face mesh's own input size
CROP_MARGIN = 1.5  # crop side over the face box's long side
MAX_BOX_GAP_S = 0.3  # no crop where the tracked box is further than this from a measured frame


class SubjectBoxes:
    """The tracked face box (normalised x0, y0, x1, y1) at any time, from the face stage's samples."""

    def __init__(self, frame_t, frame_box):
        known = [(t, b) for t, b in zip(frame_t or [], frame_box or []) if b is not None]
        self.t = np.array([k[0] for k in known], dtype=np.float64)
        self.box = np.array([k[1] for k in known], dtype=np.float64).reshape(-1, 4)

    def at(self, t: float) -> np.ndarray:
        """Linear interpolation; NaN when no measured frame lies within MAX_BOX_GAP_S."""
        if not len(self.t) or np.min(np.abs(self.t - t)) > MAX_BOX_GAP_S:
            return np.full(4, np.nan)
        return np.array([np.interp(t, self.t, self.box[:, j]) for j in range(4)])


@dataclass
class MouthSeries:
    t: np.ndarray  # seconds from clip start
    opening: np.ndarray  # inner-lip gap over face height, NaN where no mesh was fitted
    lips: list  # (20, 2) lip points in crop pixels (LIP_POINTS order), None where no mesh

    @property
    def lip_height(self) -> np.ndarray:
        """Outer-lip height over mouth width per frame, NaN where no mesh was fitted."""
        return np.array([np.nan if p is None else outer_lip_height(p) for p in self.lips], dtype=np.float64)


def outer_lip_height(lips: np.ndarray) -> float:
    """Outer-lip height over mouth width of (20, 2) lip points: scale-free, no face box needed."""
    width = float(np.linalg.norm(lips[_RIGHT] - lips[_LEFT]))
    return float(np.linalg.norm(lips[_OUTER_BOTTOM] - lips[_OUTER_TOP])) / width if width > 0 else float("nan")


class MouthTracker:
    """Face mesh on the subject's crop, frame by frame, in tracking mode within a segment."""

    def __init__(self, min_confidence: float = 0.5):
        import mediapipe as mp

        self._face_mesh = mp.solutions.face_mesh
        self.min_confidence = min_confidence

    def series(self, source: str, start_s: float, windows: list[tuple[float, float]],
               frame_t, frame_box, fps: float) -> MouthSeries:
        """The mouth in every frame inside `windows` (seconds from clip start)."""
        boxes = SubjectBoxes(frame_t, frame_box)
        times: list[float] = []
        points: list[np.ndarray | None] = []
        for w0, w1 in windows:
            with self._face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1, refine_landmarks=False,
                                          min_detection_confidence=self.min_confidence,
                                          min_tracking_confidence=self.min_confidence) as mesh:
                for t, frame in sample_frames(source, start_s + w0, start_s + w1, fps):
                    t = w0 + t
                    times.append(t)
                    points.append(self._mesh_points(mesh, frame, boxes.at(t)))
        opening = [np.nan if p is None else mouth_opening(p) for p in points]
        lips = [None if p is None else p[list(LIP_POINTS)] for p in points]
        return MouthSeries(np.asarray(times, dtype=np.float64), np.asarray(opening, dtype=np.float64), lips)

    @staticmethod
    def _mesh_points(mesh, frame: np.ndarray, box: np.ndarray) -> np.ndarray | None:
        """Face-mesh points (crop pixels) of the face inside `box`, or None."""
        if np.isnan(box).any():
            return None
        h, w = frame.shape[:2]
        crop, _ = square_crop(frame, box * np.array([w, h, w, h]), CROP_SIZE, CROP_MARGIN)
        found = mesh.process(crop).multi_face_landmarks
        if not found:
            return None
        return np.array([(lm.x * CROP_SIZE, lm.y * CROP_SIZE) for lm in found[0].landmark], dtype=np.float32)
