"""Face Constraints: one dominant, large, sharp face whose head pose moves.

Decodes each clip's sampled frames once, finds faces and their 478-point face mesh
(`lafid.face.detect`: mediapipe detection + tracking mesh, or SCRFD + a mesh per
face crop with yaw from SCRFD's 5 landmarks, which keeps profiles; see
docs/pose.md for the rig measurements behind the choice), chooses the clip's subject once
(`lafid.face.track.follow`) and measures per frame: face count, the subject's box,
score and 5 landmarks, yaw/pitch/roll, blur, area and mouth opening. Clips are kept
or rejected by the recipe's thresholds (LaFID's face count, face proportion and face
angle variation filters). Every face's crop and landmarks, and which one is the
subject, are handed on in `item.work["frames"]` (see `lafid.handoff`) so later
stages never decode, detect or choose again.
"""

from __future__ import annotations

from collections import Counter
from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from lafid.face.detect import Face, MediapipeFaces, ScrfdMeshFaces, face_blur, square_crop
from lafid.face.pose import five_points, head_pose, kps_pose, mouth_opening, pose_bucket
from lafid.face.track import follow
from lafid.handoff import FACE_CROP_MARGIN, FACE_CROP_SIZE
from lafid.item import Item
from lafid.schema import FACE, names
from lafid.stage import Resources, Stage, StageParams
from lafid.video import sample_frames


class FaceConstraintsParams(StageParams):
    sample_fps: float = Field(2.0, gt=0, description="frames analysed per second of clip")
    max_side: int = Field(640, ge=64, description="frames are downsized to this longest side for analysis")
    min_side: int = Field(320, ge=64, description="smaller frames are upsized to this shortest side (mesh accuracy)")
    detector: Literal["mediapipe", "scrfd"] = Field(
        "mediapipe", description="mediapipe: detection + tracking mesh, yaw from the mesh's axes (reads large yaw low, "
        "loses profiles); scrfd: SCRFD + mesh per face crop, yaw from SCRFD's 5 landmarks (docs/pose.md)")
    det_size: int = Field(640, ge=160, description="scrfd: detector input side")
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


class FaceConstraints(Stage):
    name = "face_constraints"
    Params = FaceConstraintsParams
    default_resources = Resources(cpus=1)
    writes = names(FACE)
    writes_work = ("frames",)  # per sampled frame: every face and which one is the subject (lafid.handoff)
    THRESHOLDS = frozenset({"min_face_ratio", "min_single_face_ratio", "min_face_area", "min_blur", "min_yaw_range"})
    MEASURE_PARAMS = frozenset({"sample_fps", "max_side", "min_side", "detector", "det_size", "detector_range",
                                "min_det_score", "max_faces", "minor_face_ratio", "large_pose_yaw"})
    DECIDES_ON = ("face_ratio", "single_face_ratio", "frame_face_count", "face_area_median", "blur_median",
                  "yaw_range")
    DECISIONS = frozenset({"no_face", "multiple_faces", "face_missing", "small_face", "blurry_face", "no_pose",
                           "static_face"})

    def setup(self) -> None:
        p: FaceConstraintsParams = self.params
        if p.detector == "scrfd":
            self._faces = ScrfdMeshFaces(p.min_det_score, p.max_faces, p.minor_face_ratio, p.det_size)
        else:
            self._faces = MediapipeFaces(p.detector_range, p.min_det_score, p.max_faces, p.minor_face_ratio)

    def teardown(self) -> None:
        self._faces.close()

    def process_item(self, item: Item) -> list[Item]:
        p: FaceConstraintsParams = self.params
        times, counts, tracked, frames = [], [], [], []
        previous = None  # the subject's last box
        with self._faces.mesh() as mesh:
            for t, frame in sample_frames(item.source, item.start_s, item.end_s, p.sample_fps, p.max_side):
                frame = self._at_least_min_side(frame)
                faces = self._faces.detect(frame, mesh)
                index = follow([f.box for f in faces], previous)
                previous = faces[index].box if index is not None else previous
                measured = [self._measure(frame, f) for f in faces]
                times.append(t)
                counts.append(len(faces))
                tracked.append(measured[index] if index is not None else None)
                frames.append({"t": t, "faces": measured, "tracked": index})
        if not times:
            return [item.drop(self.name, "no_frames", "no frames could be decoded in the clip's range")]
        item.columns.update(self._columns(times, counts, tracked))
        item.work["frames"] = frames
        return self.conclude(item)

    def _at_least_min_side(self, frame: np.ndarray) -> np.ndarray:
        short = min(frame.shape[:2])
        if short >= self.params.min_side:
            return frame
        scale = self.params.min_side / short
        return cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)

    def _measure(self, frame: np.ndarray, face: Face) -> dict:
        h, w = frame.shape[:2]
        crop, affine = square_crop(frame, face.box, FACE_CROP_SIZE, FACE_CROP_MARGIN)
        m = {
            "box": (face.box / np.array([w, h, w, h])).clip(0, 1).astype(np.float32),
            "score": face.score,
            "area": face.area / (w * h),
            "blur": face_blur(frame, face.box),
            "crop": crop,
            "yaw": np.nan, "pitch": np.nan, "roll": np.nan, "yaw_beyond": False, "mouth_open": np.nan,
            "landmarks5": None, "kps": None,
        }
        lm5 = None
        if face.mesh is not None:
            m["yaw"], m["pitch"], m["roll"] = head_pose(face.mesh)
            m["mouth_open"] = mouth_opening(face.mesh)
            lm5 = five_points(face.mesh)
        if face.kps is not None:  # SCRFD: yaw and ArcFace's landmarks from its 5 points, which hold up in profile
            yaw, pitch, roll, m["yaw_beyond"] = kps_pose(face.kps, w, h)
            m["yaw"], lm5 = yaw, np.asarray(face.kps, np.float32)
            if face.mesh is None:
                m["pitch"], m["roll"] = pitch, roll
        if lm5 is not None:
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
            "frame_yaw_beyond": [m is not None and bool(m["yaw_beyond"]) for m in tracked],
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

    def decide(self, c: dict) -> tuple[str, str] | None:
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
