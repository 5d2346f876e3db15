"""Head pose from a 478-point face mesh, and the EFHQ pose buckets.

The mesh's own 3D points give the head axes directly (eye line and forehead-chin
line), so no generic 3D face model or camera intrinsics are needed. Angles are in
degrees, in the image's frame: yaw > 0 = face turned toward the image's right,
pitch > 0 = looking up, roll > 0 = head tilted clockwise on screen.
"""

from __future__ import annotations

import numpy as np

# Face-mesh indices (mediapipe 468/478-point topology).
RIGHT_EYE_OUTER, RIGHT_EYE_INNER = 33, 133  # the subject's right eye (image left)
LEFT_EYE_INNER, LEFT_EYE_OUTER = 362, 263
NOSE_TIP, FOREHEAD, CHIN = 1, 10, 152
UPPER_LIP_INNER, LOWER_LIP_INNER = 13, 14
MOUTH_RIGHT, MOUTH_LEFT = 61, 291  # image left / image right corner

# Published EFHQ buckets: frontal |yaw|<45 & |pitch|<30; left/right |yaw|>45 & |pitch|<30;
# up/down |yaw|<45 & |pitch|>30; extreme otherwise.
BUCKET_YAW = 45.0
BUCKET_PITCH = 30.0
BUCKETS = ("frontal", "left", "right", "up", "down", "extreme")


def head_pose(points: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) from mesh points in pixels, shape (N, 3), z scaled like x."""
    x_axis = points[LEFT_EYE_OUTER] - points[RIGHT_EYE_OUTER]
    down = points[CHIN] - points[FOREHEAD]
    x_axis = x_axis / np.linalg.norm(x_axis)
    back = np.cross(x_axis, down)
    back /= np.linalg.norm(back)
    forward = -back
    yaw = np.degrees(np.arctan2(forward[0], -forward[2]))
    pitch = np.degrees(np.arctan2(-forward[1], np.hypot(forward[0], forward[2])))
    roll = np.degrees(np.arctan2(x_axis[1], x_axis[0]))
    return float(yaw), float(pitch), float(roll)


def five_points(points: np.ndarray) -> np.ndarray:
    """ArcFace's 5 landmarks (eye centres, nose tip, mouth corners), image-left first."""
    return np.stack(
        [
            (points[RIGHT_EYE_OUTER, :2] + points[RIGHT_EYE_INNER, :2]) / 2,
            (points[LEFT_EYE_INNER, :2] + points[LEFT_EYE_OUTER, :2]) / 2,
            points[NOSE_TIP, :2],
            points[MOUTH_RIGHT, :2],
            points[MOUTH_LEFT, :2],
        ]
    ).astype(np.float32)


def mouth_opening(points: np.ndarray) -> float:
    """Inner-lip gap over face height: scale-free lip activity signal."""
    gap = np.linalg.norm(points[UPPER_LIP_INNER, :2] - points[LOWER_LIP_INNER, :2])
    height = np.linalg.norm(points[FOREHEAD, :2] - points[CHIN, :2])
    return float(gap / height) if height > 0 else float("nan")


def pose_bucket(yaw: float, pitch: float) -> str:
    """EFHQ bucket of one head pose ("left" = yaw < 0 in lafid's sign convention)."""
    big_yaw, big_pitch = abs(yaw) > BUCKET_YAW, abs(pitch) > BUCKET_PITCH
    if not big_yaw and not big_pitch:
        return "frontal"
    if big_yaw and not big_pitch:
        return "right" if yaw > 0 else "left"
    if big_pitch and not big_yaw:
        return "up" if pitch > 0 else "down"
    return "extreme"
