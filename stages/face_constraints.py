"""Face Constraints: one dominant, large, sharp face whose head pose moves.

Decodes each clip's sampled frames once, runs mediapipe face detection and the
478-point face mesh, and measures per frame: face count, tracked-face box, score
and 5 landmarks, yaw/pitch/roll, blur, area and mouth opening. Clips are kept or
rejected by the recipe's thresholds (LaFID's face count, face proportion and face angle
variation filters). The tracked face's crop and landmarks are handed on in
`item.work["frames"]` (see `lafid.handoff`) so later stages never decode or detect again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import Field

from lafid.handoff import FACE_CROP_MARGIN, FACE_CROP_SIZE
from lafid.item import Item
from lafid.pose import five_points, head_pose, mouth_opening, pose_bucket
from lafid.stage import Resources, Stage, StageParams
from lafid.video import sample_frames

BLUR_SIZE = 128  # faces are resized to this before measuring blur, so sizes compare


class FaceConstraintsParams(StageParams):
    sample_fps: float = Field(2.0, gt=0, description="frames analysed per second of clip")
    max_side: int = Field(640, ge=64, description="frames are downsized to this longest side for analysis")
    min_side: int = Field(320, ge=64, description="smaller frames are upsized to this shortest side (mesh accuracy)")
    detector_range: int = Field(1, ge=0, le=1, description="mediapipe model: 0 = short range (<2 m), 1 = full range")
    min_det_score: float = Field(0.5, ge=0, le=1, description="face detection (and mesh) confidence")
    max_faces: int = Field(4, ge=1, description="faces meshed per frame")
    minor_face_ratio: float = Field(0.25, ge=0, le=1, description="faces smaller than this share of the largest are ignored")
    min_face_ratio: float = Field(0.8, ge=0, le=1, description="keep: share of frames with the tracked face")
    min_single_face_ratio: float = Field(0.8, ge=0, le=1, description="keep: share of frames with exactly one face")
    min_face_area: float = Field(0.01, ge=0, le=1, description="keep: median face box area / frame area")
    min_blur: float = Field(20.0, ge=0, description="keep: median Laplacian variance of the face")
    min_yaw_range: float = Field(0.0, ge=0, description="keep: yaw max - min in degrees (static-face filter)")
    large_pose_yaw: float = Field(45.0, ge=0, le=90, description="|yaw| counted as large pose")


@dataclass
class Face:
    box: np.ndarray  # x0, y0, x1, y1 in pixels of the analysed frame
    score: float
    mesh: np.ndarray | None = None  # (478, 3) pixels, z scaled like x

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def laplacian_variance(gray: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.resize(gray, (BLUR_SIZE, BLUR_SIZE)), cv2.CV_64F).var())


def square_crop(frame: np.ndarray, box: np.ndarray, size: int,
                margin: float = FACE_CROP_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Square crop around `box` (expanded by `margin`), resized; returns crop and its 2x3 affine."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(box[2] - box[0], box[3] - box[1]) * margin
    scale = size / side
    affine = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]], dtype=np.float32)
    crop = cv2.warpAffine(frame, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
    return crop, affine


class FaceConstraints(Stage):
    name = "face_constraints"
    Params = FaceConstraintsParams
    default_resources = Resources(cpus=1)

    def setup(self) -> None:
        import mediapipe as mp

        p: FaceConstraintsParams = self.params
        self._mp = mp
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=p.detector_range, min_detection_confidence=p.min_det_score
        )

    def teardown(self) -> None:
        self._detector.close()

    def _mesh(self):
        """A fresh tracking face mesh per clip: tracking state must not cross a cut."""
        return self._mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False,
            max_num_faces=self.params.max_faces,
            refine_landmarks=True,
            min_detection_confidence=self.params.min_det_score,
        )

    def process_item(self, item: Item) -> list[Item]:
        p: FaceConstraintsParams = self.params
        times, counts, tracked, frames = [], [], [], []
        previous: Face | None = None
        with self._mesh() as mesh:
            for t, frame in sample_frames(item.source, item.start_s, item.end_s, p.sample_fps, p.max_side):
                frame = self._at_least_min_side(frame)
                faces = self._faces(frame, mesh)
                index = self._track(faces, previous)
                previous = faces[index] if index is not None else previous
                measured = [self._measure(frame, f) for f in faces]
                times.append(t)
                counts.append(len(faces))
                tracked.append(measured[index] if index is not None else None)
                frames.append({"t": t, "faces": measured, "tracked": index})
        if not times:
            return [item.drop(self.name, "no_frames", "no frames could be decoded in the clip's range")]
        item.columns.update(self._columns(times, counts, tracked))
        item.work["frames"] = frames
        reason = self._verdict(item.columns)
        if reason:
            code, detail = reason
            return [item.drop(self.name, code, detail)]
        return [item]

    def _at_least_min_side(self, frame: np.ndarray) -> np.ndarray:
        short = min(frame.shape[:2])
        if short >= self.params.min_side:
            return frame
        scale = self.params.min_side / short
        return cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)

    def _faces(self, frame: np.ndarray, mesh) -> list[Face]:
        h, w = frame.shape[:2]
        faces = []
        for det in self._detector.process(frame).detections or []:
            rel = det.location_data.relative_bounding_box
            box = np.array([rel.xmin * w, rel.ymin * h, (rel.xmin + rel.width) * w, (rel.ymin + rel.height) * h])
            faces.append(Face(box=box, score=float(det.score[0])))
        if faces:
            largest = max(f.area for f in faces)
            faces = [f for f in faces if f.area >= self.params.minor_face_ratio * largest]
        for landmarks in mesh.process(frame).multi_face_landmarks or []:
            pts = np.array([(lm.x * w, lm.y * h, lm.z * w) for lm in landmarks.landmark], dtype=np.float32)
            mesh_box = np.array([*pts[:, :2].min(0), *pts[:, :2].max(0)])
            best = max(faces, key=lambda f: iou(f.box, mesh_box), default=None)
            if best is not None and best.mesh is None and iou(best.box, mesh_box) > 0.3:
                best.mesh = pts
        return faces

    @staticmethod
    def _track(faces: list[Face], previous: Face | None) -> int | None:
        """Index of the face that overlaps the last tracked one; else of the largest."""
        if not faces:
            return None
        if previous is not None:
            overlap = max(range(len(faces)), key=lambda i: iou(faces[i].box, previous.box))
            if iou(faces[overlap].box, previous.box) > 0.3:
                return overlap
        return max(range(len(faces)), key=lambda i: faces[i].area)

    def _measure(self, frame: np.ndarray, face: Face) -> dict:
        h, w = frame.shape[:2]
        crop, affine = square_crop(frame, face.box, FACE_CROP_SIZE)
        gray = cv2.cvtColor(square_crop(frame, face.box, BLUR_SIZE, margin=1.0)[0], cv2.COLOR_RGB2GRAY)
        m = {
            "box": (face.box / np.array([w, h, w, h])).clip(0, 1).astype(np.float32),
            "score": face.score,
            "area": face.area / (w * h),
            "blur": laplacian_variance(gray),
            "crop": crop,
            "yaw": np.nan, "pitch": np.nan, "roll": np.nan, "mouth_open": np.nan, "landmarks5": None,
            "kps": None,
        }
        if face.mesh is not None:
            m["yaw"], m["pitch"], m["roll"] = head_pose(face.mesh)
            m["mouth_open"] = mouth_opening(face.mesh)
            lm5 = five_points(face.mesh)
            m["kps"] = (lm5 / np.array([w, h], np.float32)).ravel()
            m["landmarks5"] = (lm5 @ affine[:, :2].T + affine[:, 2]).astype(np.float32)
        return m

    def _columns(self, times, counts, tracked) -> dict:
        p: FaceConstraintsParams = self.params

        def series(key):
            return [np.nan if m is None else float(m[key]) for m in tracked]

        yaw, pitch, roll = (np.array(series(k), dtype=np.float32) for k in ("yaw", "pitch", "roll"))
        posed = ~np.isnan(yaw)
        area, blur = np.array(series("area")), np.array(series("blur"))
        present = np.array([m is not None for m in tracked])
        buckets = [pose_bucket(y, pt) for y, pt in zip(yaw[posed], pitch[posed])]

        def spread(values):
            v = values[~np.isnan(values)]
            return float(v.max() - v.min()) if v.size else None

        def stat(fn, values):
            v = values[~np.isnan(values)]
            return float(fn(v)) if v.size else None

        return {
            "sample_fps": p.sample_fps,
            "frame_t": [float(t) for t in times],
            "frame_face_count": counts,
            "frame_box": [None if m is None else m["box"].tolist() for m in tracked],
            "frame_kps": [None if m is None or m["kps"] is None else m["kps"].tolist() for m in tracked],
            "frame_score": series("score"),
            "frame_yaw": yaw.tolist(),
            "frame_pitch": pitch.tolist(),
            "frame_roll": roll.tolist(),
            "frame_blur": blur.tolist(),
            "frame_area": area.tolist(),
            "frame_mouth_open": series("mouth_open"),
            "face_ratio": float(present.mean()),
            "single_face_ratio": float(np.mean(np.array(counts) == 1)),
            "face_area_median": stat(np.median, area),
            "blur_median": stat(np.median, blur),
            "yaw_min": stat(np.min, yaw),
            "yaw_max": stat(np.max, yaw),
            "yaw_range": spread(yaw),
            "abs_yaw_max": stat(np.max, np.abs(yaw)),
            "pitch_range": spread(pitch),
            "roll_range": spread(roll),
            "large_pose_ratio": float(np.mean(np.abs(yaw[posed]) >= p.large_pose_yaw)) if posed.any() else None,
            "pose_bucket": Counter(buckets).most_common(1)[0][0] if buckets else None,
            "pose_buckets": sorted(set(buckets)),
        }

    def _verdict(self, c: dict) -> tuple[str, str] | None:
        """First failed constraint as (reason code, detail), or None to keep."""
        p: FaceConstraintsParams = self.params
        if c["face_ratio"] == 0:
            return "no_face", "no face detected in any sampled frame"
        if c["single_face_ratio"] < p.min_single_face_ratio and max(c["frame_face_count"]) > 1:
            return "multiple_faces", f"one face in {c['single_face_ratio']:.0%} of frames (< {p.min_single_face_ratio:.0%})"
        if c["face_ratio"] < p.min_face_ratio:
            return "face_missing", f"face in {c['face_ratio']:.0%} of frames (< {p.min_face_ratio:.0%})"
        if c["face_area_median"] < p.min_face_area:
            return "small_face", f"median face area {c['face_area_median']:.4f} (< {p.min_face_area})"
        if c["blur_median"] < p.min_blur:
            return "blurry_face", f"median sharpness {c['blur_median']:.1f} (< {p.min_blur})"
        if c["yaw_range"] is None:
            return "no_pose", "no face mesh could be fitted"
        if c["yaw_range"] < p.min_yaw_range:
            return "static_face", f"yaw range {c['yaw_range']:.1f} deg (< {p.min_yaw_range})"
        return None
