"""Head pose from a 478-point face mesh or from 5 detector landmarks, and the EFHQ pose buckets.

`head_pose`: the mesh's own 3D points give the head axes directly (eye line and
forehead-chin line). Measured on the ground-truth rig (`lafid.rig`,
benchmarks/pose_accuracy.py) it reads yaw about 0.7x the truth, saturates near 40
degrees and falls back to small angles in profile. `kps_pose`: the 5 SCRFD
landmarks fitted to a generic 3D face (solvePnP) stay monotone up to about 80
degrees; their yaw is scaled by a gain measured on the rig and anything beyond
MAX_KPS_YAW is flagged as past what it can measure. Angles are in degrees, in the
image's frame: yaw > 0 = face turned toward the image's right, pitch > 0 = looking
up, roll > 0 = head tilted clockwise on screen.
"""

from __future__ import annotations

import cv2
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


# Generic 3D face for the 5 ArcFace landmarks (eye centres, nose tip, mouth corners), in face heights
# (forehead to chin), x right, y down, z away from the camera: a frontal face mesh's own points, made symmetric.
KPS_MODEL = np.array([[-0.2, -0.195, 0.064], [0.2, -0.195, 0.064], [0.0, 0.03, -0.22],
                      [-0.175, 0.223, 0.006], [0.175, 0.223, 0.006]])
# Rig-measured: solvePnP on SCRFD's 5 landmarks reads yaw low by this factor (least squares of true over
# raw yaw, 10 < |yaw| < 75: astronaut 1.28, Grace Hopper 1.26, carphone 1.26 with faces 30-50% of the frame height,
# 1.19-1.38 at 12-20%; benchmarks/pose_accuracy.py).
KPS_YAW_GAIN = 1.25
# Beyond this the 5 landmarks no longer tell 75 from 90 degrees (rig: readings saturate).
MAX_KPS_YAW = 75.0


def kps_angles(kps: np.ndarray, width: int, height: int) -> tuple[float, float, float]:
    """Raw (yaw, pitch, roll) of 5 landmarks in pixels of a width x height frame: solvePnP on KPS_MODEL."""
    f = 1.5 * max(width, height)  # about a 37 degree field of view; the fit is insensitive to it
    camera = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
    image = np.asarray(kps, np.float64).reshape(5, 2)
    _, rvec, tvec = cv2.solvePnP(KPS_MODEL, image, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    _, rvec, tvec = cv2.solvePnP(KPS_MODEL, image, camera, None, rvec, tvec, True, flags=cv2.SOLVEPNP_ITERATIVE)
    forward = cv2.Rodrigues(rvec)[0] @ np.array([0.0, 0.0, -1.0])
    yaw = np.degrees(np.arctan2(forward[0], -forward[2]))
    pitch = np.degrees(np.arctan2(-forward[1], np.hypot(forward[0], forward[2])))
    eyes = image[1] - image[0]
    return float(yaw), float(pitch), float(np.degrees(np.arctan2(eyes[1], eyes[0])))


def kps_pose(kps: np.ndarray, width: int, height: int) -> tuple[float, float, float, bool]:
    """(yaw, pitch, roll, beyond) from 5 landmarks: `kps_angles` with yaw scaled by KPS_YAW_GAIN.

    `beyond` flags a face turned past MAX_KPS_YAW: its yaw is reported as that bound
    with the measured sign, not as a smaller wrong angle."""
    yaw, pitch, roll = kps_angles(kps, width, height)
    yaw *= KPS_YAW_GAIN
    return float(np.clip(yaw, -MAX_KPS_YAW, MAX_KPS_YAW)), pitch, roll, bool(abs(yaw) > MAX_KPS_YAW)


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
