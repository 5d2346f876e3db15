"""Clip quality: motion, burned-in text area and (with a model you supply) an aesthetic score.

- Motion: Farneback optical flow between neighbouring frames, `motion_fps` pairs a
  second, at `motion_side` pixels, in frame sides per second so resolution does not change it.
  The median flow vector of a frame pair is taken as the camera's part; what is
  left around it is the subject's.
- Text: the PP-OCRv4 text detector that `rapidocr-onnxruntime` ships (only its
  detection ONNX, run with onnxruntime). Its probability map is thresholded as
  RapidOCR does (0.3), regions whose mean probability passes `text_box_score` are
  kept if wider than tall (text lines; eyes and mouths can score as text), and the
  share of the frame their boxes cover in at least half the sampled frames is the
  text area: burned-in captions and watermarks stay put, false hits on a face move.
- Aesthetic: an ONNX file `aesthetic.onnx` in `aesthetic_model` (e.g. a LAION-style
  head exported together with its CLIP image tower) taking a 1x3x224x224 float image
  (RGB, CLIP mean/std) and returning one score. Without it the column stays null.

Every threshold is off by default: the stage measures, a recipe decides.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import cv2
import numpy as np
from pydantic import Field

from lafid.item import Item
from lafid.schema import QUALITY, names
from lafid.stage import Resources, Stage, StageParams
from lafid.video import sample_frames

DET_MODEL = "models/ch_PP-OCRv4_det_infer.onnx"
LINE_ASPECT = 1.5  # text boxes at least this many times wider than tall count
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


class ClipQualityParams(StageParams):
    motion_fps: float = Field(5.0, gt=0, description="frame pairs per second on which motion is measured")
    motion_side: int = Field(160, ge=32, description="longer side of the frames optical flow runs on")
    text_samples: int = Field(4, ge=1, description="frames, evenly spread over the clip, given to the text detector")
    text_side: int = Field(640, ge=64, description="longer side of the text detector's input (rounded to 32)")
    text_box_score: float = Field(0.6, gt=0, lt=1, description="mean text probability a detected region needs")
    aesthetic_model: str | None = Field(None, description="folder holding aesthetic.onnx; None = no aesthetic score")
    min_motion: float | None = Field(None, ge=0, description="reject `too_still` below this motion; None = off")
    max_motion: float | None = Field(None, gt=0, description="reject `too_much_motion` above this; None = off")
    max_text_area: float | None = Field(None, gt=0, le=1, description="reject `text_overlay` above this; None = off")


def text_detector_path() -> Path:
    """The text-detection ONNX inside the installed rapidocr-onnxruntime package."""
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        raise RuntimeError("clip_quality needs rapidocr-onnxruntime==1.4.4 (see requirements-nodeps.txt)")
    path = Path(spec.origin).parent / DET_MODEL
    if not path.is_file():
        raise RuntimeError(f"text detector model missing: {path}")
    return path


def frame_pairs(source: str, start_s: float, end_s: float, every_s: float, side: int):
    """Neighbouring source frames, one pair every `every_s` seconds: between neighbours motion is
    small enough for Farneback to follow a fast pan (0.2 s apart it loses it)."""
    prev, next_t = None, 0.0
    for t, frame in sample_frames(source, start_s, end_s, 1000.0, side):
        if prev is not None and prev[0] >= next_t - 1e-6:
            yield prev, (t, frame)
            next_t = prev[0] + every_s
        prev = (t, frame)


def flow_motion(pairs) -> tuple[float, float, float]:
    """(motion, camera part, subject part) in frame sides per second, means over frame pairs."""
    total, camera, subject = [], [], []
    for (t0, a), (t1, b) in pairs:
        dt = t1 - t0
        if dt <= 0:
            continue
        g0, g1 = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (a, b))
        flow = cv2.calcOpticalFlowFarneback(g0, g1, None, 0.5, 3, 15, 3, 5, 1.2, 0) / (max(a.shape[:2]) * dt)
        median = np.median(flow.reshape(-1, 2), axis=0)
        total.append(float(np.linalg.norm(flow, axis=2).mean()))
        camera.append(float(np.linalg.norm(median)))
        subject.append(float(np.linalg.norm(flow - median, axis=2).mean()))
    if not total:
        return 0.0, 0.0, 0.0
    return float(np.mean(total)), float(np.mean(camera)), float(np.mean(subject))


class TextDetector:
    """PP-OCRv4 text detection -> share of the frame inside text boxes."""

    def __init__(self, side: int, box_score: float, threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = threads
        self.session = ort.InferenceSession(str(text_detector_path()), opts, providers=["CPUExecutionProvider"])
        self.side, self.box_score = side, box_score

    def mask(self, rgb: np.ndarray) -> np.ndarray:
        """Boxes of the text lines found, as a boolean map at the detector's resolution."""
        h, w = rgb.shape[:2]
        s = self.side / max(h, w)
        size = (max(32, int(round(w * s / 32)) * 32), max(32, int(round(h * s / 32)) * 32))
        img = cv2.resize(rgb[..., ::-1], size).astype(np.float32) / 255.0
        x = ((img - 0.5) / 0.5).transpose(2, 0, 1)[None]
        prob = self.session.run(None, {self.session.get_inputs()[0].name: x})[0][0, 0]
        count, labels, stats, _ = cv2.connectedComponentsWithStats((prob > 0.3).astype(np.uint8), connectivity=4)
        covered = np.zeros(prob.shape, bool)
        for k in range(1, count):
            x0, y0, bw, bh, pixels = stats[k]
            # a line of text is wider than tall; a face's features can score as text but are not
            if pixels >= 8 and bw >= LINE_ASPECT * bh and prob[labels == k].mean() >= self.box_score:
                covered[y0:y0 + bh, x0:x0 + bw] = True
        return covered


def overlay(masks: list[np.ndarray]) -> tuple[float, float]:
    """(share of the frame covered by text in at least half the frames, share of frames with text).
    Burned-in captions and watermarks stay put; a false detection on a moving face does not."""
    shapes = {m.shape for m in masks}
    persistent = np.mean(masks, axis=0) >= 0.5 if len(shapes) == 1 else np.zeros(1, bool)
    return float(persistent.mean()), float(np.mean([m.any() for m in masks]))


class AestheticModel:
    """`aesthetic.onnx` from a user's folder: CLIP-normalised 224x224 RGB in, one score out."""

    def __init__(self, folder: str, threads: int = 1):
        import onnxruntime as ort

        path = Path(folder) / "aesthetic.onnx"
        if not path.is_file():
            raise RuntimeError(f"aesthetic_model: no aesthetic.onnx in {folder}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def score(self, rgb: np.ndarray) -> float:
        h, w = rgb.shape[:2]
        s = 224 / min(h, w)  # CLIP preprocessing: shorter side to 224, centre crop
        img = cv2.resize(rgb, (max(224, round(w * s)), max(224, round(h * s))), interpolation=cv2.INTER_CUBIC)
        y, x = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
        img = (img[y:y + 224, x:x + 224].astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
        out = self.session.run(None, {self.session.get_inputs()[0].name: img.transpose(2, 0, 1)[None]})[0]
        return float(np.asarray(out).reshape(-1)[0])


class ClipQuality(Stage):
    name = "clip_quality"
    Params = ClipQualityParams
    default_resources = Resources(cpus=1)
    writes = names(QUALITY)
    THRESHOLDS = frozenset({"min_motion", "max_motion", "max_text_area"})
    MEASURE_PARAMS = frozenset({"motion_fps", "motion_side", "text_samples", "text_side", "text_box_score",
                                "aesthetic_model"})
    DECISIONS = frozenset({"too_still", "too_much_motion", "text_overlay"})
    DECIDES_ON = ("motion", "text_area")

    def setup(self) -> None:
        p: ClipQualityParams = self.params
        self.text = TextDetector(p.text_side, p.text_box_score, self.resources.threads)
        self.aesthetic = AestheticModel(p.aesthetic_model, self.resources.threads) if p.aesthetic_model else None

    def process_item(self, item: Item) -> list[Item]:
        p: ClipQualityParams = self.params
        motion, camera, subject = flow_motion(frame_pairs(item.source, item.start_s, item.end_s,
                                                          1.0 / p.motion_fps, p.motion_side))
        span = max(item.end_s - item.start_s, 1e-3)
        big = [f for _, f in sample_frames(item.source, item.start_s, item.end_s, p.text_samples / span, p.text_side)]
        if not big:
            return [item.drop(self.name, "undecodable", "no frames in the clip's range")]
        text_area, text_frames = overlay([self.text.mask(f) for f in big])
        item.columns.update(motion=motion, motion_camera=camera, motion_subject=subject,
                            text_area=text_area, text_frames=text_frames,
                            aesthetic=self.aesthetic.score(big[len(big) // 2]) if self.aesthetic else None)
        return self.conclude(item)

    def decide(self, c: dict) -> tuple[str, str] | None:
        p: ClipQualityParams = self.params
        motion, text_area = c["motion"], c["text_area"]
        for bad, reason in ((p.min_motion is not None and motion < p.min_motion, "too_still"),
                            (p.max_motion is not None and motion > p.max_motion, "too_much_motion"),
                            (p.max_text_area is not None and text_area > p.max_text_area, "text_overlay")):
            if bad:
                return reason, f"motion {motion:.3f}/s, text area {text_area:.3f}"
        return None
