"""Identity encoders: aligned face crop in, embedding out, with the backend's metric.

Two real backends share one interface:
- `ArcFaceEncoder`: insightface ArcFace ONNX (antelopev2 `glintr100.onnx` or
  buffalo_l `w600k_r50.onnx`) from a model directory the user supplies, faces
  aligned to 112x112 by `face_align.norm_crop` on the 5 landmarks, onnxruntime,
  batched, L2-normalised. Metric: cosine distance (1 - cos).
- `DlibEncoder`: dlib's ResNet 128-d descriptor with its own 5-point alignment,
  weights from the `face-recognition-models` wheel (runs offline). Metric: L2.

Both accept the upstream hand-off: a square RGB crop around the detection box
(box centred, long side = crop / margin) and 5 landmarks in crop pixels.
Nothing here downloads weights.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np

from lafid.handoff import FACE_CROP_MARGIN

def pairwise(metric: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distances between rows of `a` (M, D) and `b` (N, D) in `metric` ("l2" or "cosine")."""
    a, b = np.atleast_2d(a).astype(np.float32), np.atleast_2d(b).astype(np.float32)
    if metric == "cosine":
        return 1.0 - unit(a) @ unit(b).T
    if metric == "l2":
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.sqrt(np.maximum(sq, 0.0))
    raise ValueError(f"unknown metric {metric!r}")


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def centroid(metric: str, embeddings: np.ndarray) -> np.ndarray:
    """Mean embedding; on the unit sphere for cosine so distances to it stay comparable."""
    mean = np.asarray(embeddings, dtype=np.float32).mean(0)
    return unit(mean) if metric == "cosine" else mean


class IdentityEncoder(ABC):
    """An embedding backend. `threshold` is the same-person distance in `metric`."""

    name: ClassVar[str]
    metric: ClassVar[str]
    threshold: ClassVar[float]
    dim: int

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


def _package_file(package: str, *parts: str) -> str:
    """A data file inside an installed package, found without importing it (GUIDE §2)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install face-recognition-models)")
    return os.path.join(list(spec.submodule_search_locations)[0], *parts)


class DlibEncoder(IdentityEncoder):
    """dlib ResNet descriptor; same person below L2 0.6 (dlib's published operating point)."""

    name = "dlib"
    metric = "l2"
    threshold = 0.6
    dim = 128
    CHIP_SIZE, CHIP_PADDING = 150, 0.25  # the chip layout dlib's network was trained on

    def __init__(self, batch_size: int = 32):
        super().__init__(batch_size)
        import dlib

        self._dlib = dlib
        models = _package_file("face_recognition_models", "models")
        self._landmarks = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
        self._net = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))

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
    """insightface ArcFace ONNX; same person below cosine distance 0.7 (cos >= 0.3).

    Threshold choice: with w600k_r50 / glintr100, different people score cos ≈ 0 ± 0.1
    while one person across large head turns stays ≈ 0.3-0.8.
    """

    name = "arcface"
    metric = "cosine"
    threshold = 0.7
    # Looked up in this order under the model directory (a pack folder or its parent).
    MODEL_FILES = ("antelopev2/glintr100.onnx", "buffalo_l/w600k_r50.onnx", "glintr100.onnx", "w600k_r50.onnx")
    DEFAULT_DIR = "~/.insightface/models"

    def __init__(self, model_dir: str | os.PathLike = DEFAULT_DIR, batch_size: int = 32, threads: int = 1,
                 use_gpu: bool = False):
        super().__init__(batch_size)
        import onnxruntime as ort

        self.model_path = self.find_model(model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        wanted = ["CUDAExecutionProvider"] if use_gpu else []
        providers = [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]
        self._session = ort.InferenceSession(str(self.model_path), opts, providers=providers)
        (inp,), out = self._session.get_inputs(), self._session.get_outputs()[0]
        if len(inp.shape) != 4 or inp.shape[1] != 3 or inp.shape[2] != inp.shape[3]:
            raise ValueError(f"{self.model_path}: input {inp.shape} is not N x 3 x S x S")
        self._input = inp.name
        self.size = int(inp.shape[2])
        # A model fixed to batch 1 (some exports) is run one face at a time.
        self._fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        self.dim = int(out.shape[-1])
        self._mean, self._std = self._input_scaling(self.model_path)

    @classmethod
    def find_model(cls, model_dir: str | os.PathLike) -> Path:
        """The first known model file under `model_dir`, or an error naming all it looked for."""
        root = Path(model_dir).expanduser()
        for rel in cls.MODEL_FILES:
            if (root / rel).is_file():
                return root / rel
        expected = ", ".join(str(root / rel) for rel in cls.MODEL_FILES)
        raise FileNotFoundError(
            f"no ArcFace model found; expected one of: {expected}. Unpack insightface's antelopev2 or "
            f"buffalo_l pack there (lafid never downloads weights), or use the 'dlib' backend."
        )

    @staticmethod
    def _input_scaling(path: Path) -> tuple[float, float]:
        """insightface's convention: a graph that starts with Sub and Mul normalises its own input."""
        import onnx

        ops = {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node[:8]}
        return (0.0, 1.0) if {"Sub", "Mul"} <= ops else (127.5, 127.5)

    def align(self, crop: np.ndarray, landmarks5: np.ndarray | None) -> np.ndarray | None:
        if landmarks5 is None:
            return None
        from insightface.utils import face_align

        return face_align.norm_crop(crop, landmark=np.asarray(landmarks5, np.float32), image_size=self.size)

    def _embed_batch(self, chips: list[np.ndarray]) -> np.ndarray:
        blob = (np.stack(chips).astype(np.float32) - self._mean) / self._std
        blob = np.ascontiguousarray(blob.transpose(0, 3, 1, 2))
        step = self._fixed_batch or len(blob)
        out = [self._session.run(None, {self._input: blob[i:i + step]})[0] for i in range(0, len(blob), step)]
        return unit(np.concatenate(out).reshape(len(blob), -1))


BACKENDS: dict[str, type[IdentityEncoder]] = {"arcface": ArcFaceEncoder, "dlib": DlibEncoder}


def open_encoder(backend: str = "auto", model_dir: str | os.PathLike = ArcFaceEncoder.DEFAULT_DIR,
                 batch_size: int = 32, threads: int = 1, use_gpu: bool = False) -> IdentityEncoder:
    """The requested backend; "auto" is ArcFace whenever its model directory holds a model, else dlib."""
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
