"""Clip shards -> training samples: target frames, a pose-aware reference face, caption, embeddings.

One epoch's order is a pure function of (seed, epoch): shards in a seeded order,
rows shuffled within each shard (so a worker reads each shard once), each row
repeated by its pose-bucket weight. Ranks take every world_size-th entry (cut to
equal length so they stay in step), DataLoader workers every num_workers-th of
those: no clip is seen twice in an epoch unless its weight asks for it. Position =
(epoch, samples this rank consumed), enough to resume exactly; per-sample
randomness is seeded by the sample's place in the epoch's global order (`place`,
also handed to the trainer for its noise), not by the rank or the worker: 2 ranks
x batch b see the samples and draws of 1 process x batch 2b.
"""

from __future__ import annotations

import posixpath
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import cv2
import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from lafid.cofe.cache import collate_cached, open_cache
from lafid.cofe.config import DataConfig
from lafid.cofe.exclude import COLUMNS as EXCLUSION_COLUMNS, Exclusion
from lafid.face.detect import square_crop
from lafid.face.embed import ARCFACE_SIZE, arcface_align
from lafid.face.pose import pose_bucket
from lafid.schema import source_path
from lafid.shards import find_shards
from lafid.video import sample_frames

COLUMNS = ["clip_id", "source", "source_bytes", "start_s", "end_s", "fps", "frame_t", "frame_yaw", "frame_pitch",
           "frame_box", "frame_kps", "pose_buckets", "caption", "id_backend", "id_ref_embedding", "id_ref_t",
           "id_rep_embeddings", "id_rep_t", "id_rep_yaw", "id_model_sha256", "clip_file"]


def exported_clip(row: dict, shard_path: str) -> dict:
    """A row of `lafid export` (`clip_file` set) reads its own MP4 beside the shard, whose time 0
    is the clip's `start_s`: no source video is needed. Curate rows come back unchanged."""
    if not row.get("clip_file"):
        return row
    return dict(row, source=posixpath.join(posixpath.dirname(shard_path), row["clip_file"]), source_bytes=None,
                start_s=0.0, end_s=row["end_s"] - row["start_s"])


@dataclass(frozen=True)
class FacePose:
    t: float          # seconds from clip start
    pitch: float
    bucket: str
    box: tuple[float, float, float, float]
    kps: tuple[float, ...] | None  # 5 landmarks x0,y0,...,x4,y4 over frame size; None without a mesh
    embedding: tuple[float, ...] | None  # precomputed identity embedding of this very face, if any


def frame_poses(row: dict) -> list[FacePose]:
    """Every sampled frame with a measured face; carries the reference embedding at its own time."""
    t = np.asarray(row["frame_t"] or [], np.float64)
    yaw = np.asarray([np.nan if v is None else v for v in row["frame_yaw"] or []], np.float64)
    pitch = np.nan_to_num(np.asarray([np.nan if v is None else v for v in row["frame_pitch"] or []], np.float64))
    boxes = row["frame_box"] or []
    kps = row.get("frame_kps") or [None] * len(boxes)  # shards written before the column have none
    ref_t, ref_emb = row.get("id_ref_t"), row.get("id_ref_embedding")
    poses = [FacePose(float(t[i]), float(pitch[i]), pose_bucket(yaw[i], pitch[i]), tuple(boxes[i]),
                      None if kps[i] is None else tuple(kps[i]),
                      tuple(ref_emb) if ref_emb and ref_t is not None and abs(ref_t - t[i]) < 1e-3 else None)
             for i in range(len(t)) if not np.isnan(yaw[i]) and boxes[i] is not None]
    if not poses:
        raise ValueError(f"clip {row['clip_id']} has no measured face")
    return poses


def shard_embeddings_usable(row: dict, cfg: DataConfig) -> bool:
    """Whether the row's precomputed identity embeddings come from the trainer's identity model: same
    `id_backend` (a dlib vector is no ArcFace vector), and, when `data.id_model_sha256` is known, the
    same model file (two files named w600k_r50 need not be one model). A hash mismatch, or a row written
    without one, warns once per pair of hashes; its embeddings are then computed from the face crops."""
    if row.get("id_backend") != cfg.id_backend:
        return False
    want, got = cfg.id_model_sha256, row.get("id_model_sha256")
    if want is None or got == want:
        return True
    if row.get("id_ref_embedding") or row.get("id_rep_embeddings"):
        warnings.warn(f"shard identity embeddings ({row.get('id_backend')}) not used, computed from the face "
                      f"crops instead: shard model sha256 {got or 'not recorded'}, trainer's identity model "
                      f"sha256 {want}", stacklevel=2)
    return False


def reference_poses(row: dict, frames: list[FacePose], cfg: DataConfig) -> list[FacePose]:
    """Reference candidates: the identity stage's pose-diverse representatives when present, else every frame.

    Precomputed embeddings are kept only when they come from the trainer's identity
    model (`shard_embeddings_usable`).
    """
    if not shard_embeddings_usable(row, cfg):
        return [replace(p, embedding=None) for p in frames]
    if not row.get("id_rep_embeddings"):
        return frames
    out = []
    for rt, ryaw, emb in zip(row["id_rep_t"], row["id_rep_yaw"], row["id_rep_embeddings"]):
        near = min(frames, key=lambda p: abs(p.t - rt))  # representatives store yaw only: borrow pitch, box, kps
        out.append(replace(near, t=rt, bucket=pose_bucket(ryaw, near.pitch), embedding=tuple(emb)))
    return out


def plan_clip(row: dict, cfg: DataConfig, rng: np.random.Generator) -> tuple[float, FacePose, set[str], set[str]]:
    """(target window start, reference face, target buckets, clip buckets): the reference's pose bucket
    differs from every target frame's whenever the clip has more than one bucket."""
    frames = frame_poses(row)
    refs = reference_poses(row, frames, cfg)
    duration = row["end_s"] - row["start_s"]
    span = (cfg.num_frames - 1) * cfg.frame_stride / row["fps"]
    starts = np.linspace(0.0, max(0.0, duration - span), num=16) if duration > span else np.zeros(1)

    def buckets_in(a: float) -> set[str]:
        inside = {p.bucket for p in frames if a - 1e-6 <= p.t <= a + span + 1e-6}
        return inside or {min(frames, key=lambda p: abs(p.t - a - span / 2)).bucket}

    plans = [(a, buckets_in(a)) for a in starts]
    useful = [(a, b) for a, b in plans if any(p.bucket not in b for p in refs)]
    a, targets = (useful or plans)[rng.integers(len(useful or plans))]
    other = [p for p in refs if p.bucket not in targets]
    outside = [p for p in refs if not a <= p.t <= a + span]
    pool = other or outside or refs
    return float(a), pool[rng.integers(len(pool))], targets, {p.bucket for p in frames} | {p.bucket for p in refs}


def reference_set(row: dict, cfg: DataConfig, start: float, ref: FacePose, targets: set[str]) -> list[FacePose]:
    """Up to `data.id_references` reference faces, `ref` first; the others are taken one at a time from
    the candidates (`reference_poses`), preferring a pose bucket not yet taken, then one outside the
    target buckets and window, then the farthest in time from those already taken."""
    chosen = [ref]
    if cfg.id_references == 1:
        return chosen
    span = (cfg.num_frames - 1) * cfg.frame_stride / row["fps"]
    left = [p for p in reference_poses(row, frame_poses(row), cfg) if abs(p.t - ref.t) > 1e-3]
    while left and len(chosen) < cfg.id_references:
        def score(p: FacePose) -> tuple:
            return (p.bucket not in {c.bucket for c in chosen}, p.bucket not in targets,
                    not start <= p.t <= start + span, min(abs(p.t - c.t) for c in chosen))
        best = max(left, key=score)
        chosen.append(best)
        left = [p for p in left if abs(p.t - best.t) > 1e-3]
    return chosen


def fit(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Centre-crop to the target aspect, then resize."""
    h, w = frame.shape[:2]
    scale = min(w / width, h / height)
    cw, ch = int(round(width * scale)), int(round(height * scale))
    x, y = (w - cw) // 2, (h - ch) // 2
    return cv2.resize(frame[y:y + ch, x:x + cw], (width, height), interpolation=cv2.INTER_AREA)


def crop_face(frame: np.ndarray, box: Sequence[float], margin: float, size: int) -> np.ndarray:
    """Square crop around a normalised box, enlarged by `margin` on each side, edge-padded, resized to `size`."""
    h, w = frame.shape[:2]
    pixels = np.asarray(box, np.float64) * np.array([w, h, w, h])
    return square_crop(frame, pixels, size, 1 + 2 * margin, cv2.BORDER_REPLICATE, antialias=True)[0]


def identity_face(frame: np.ndarray, face: FacePose, margin: float) -> np.ndarray:
    """The identity expert's 112x112 input, aligned as the identity stage aligns it (`arcface_align`,
    insightface `norm_crop` on the 5 landmarks); only a frame without them (no mesh) gets the box crop."""
    if face.kps is None:
        return crop_face(frame, face.box, margin, ARCFACE_SIZE)
    h, w = frame.shape[:2]
    return arcface_align(frame, np.asarray(face.kps, np.float32).reshape(5, 2) * np.array([w, h], np.float32))


def decode_frames(source: str, start_s: float, fps: float, count: int, stride: int) -> list[np.ndarray]:
    """`count` frames from `start_s`, `stride` source frames apart; the last repeats if the video ends."""
    step = stride / fps
    end = start_s + count * step
    frames = [f for _, f in sample_frames(source, start_s, end, fps / stride)][:count]
    if not frames:
        raise ValueError(f"no frames decoded from {source} at {start_s:.3f}s")
    return frames + [frames[-1]] * (count - len(frames))


class ClipDataset(IterableDataset):
    """Training samples from clip shards; see the module docstring for splitting and resume."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1, cache_shards: int = 2):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.fs, self.files = find_shards(cfg.shards)
        self.cache_shards = cache_shards
        self.rows: list[list[int]] = []      # row indices per file
        self.weights: list[np.ndarray] = []  # repeat factor per row
        exclusion = Exclusion(cfg.exclude) if cfg.exclude else None
        self.excluded = 0  # clips held out for a bench
        for path in self.files:
            names = pq.read_schema(path, filesystem=self.fs).names
            extra = [c for c in EXCLUSION_COLUMNS if c in names] if exclusion else []
            table = pq.read_table(path, columns=["pose_buckets", *extra], filesystem=self.fs)
            buckets = table["pose_buckets"].to_pylist()
            keep = exclusion.keep(table) if exclusion else np.ones(len(buckets), bool)
            self.excluded += int((~keep).sum())
            self.rows.append([r for r in range(len(buckets)) if keep[r]])
            self.weights.append(np.array([max((cfg.bucket_weights.get(b, 1.0) for b in bs or []), default=1.0)
                                          for bs in buckets]))
        self.epoch, self.offset = 0, 0
        self.spans_epochs = False
        self._lengths: dict[int, int] = {}
        self._tables: OrderedDict[int, list[dict]] = OrderedDict()
        self.cache = open_cache(cfg.cache, self)  # precomputed inputs (`lafid cache`): no decoding when present

    def set_position(self, epoch: int, offset: int) -> None:
        """Start the next iteration at sample `offset` of `epoch` (this rank's count)."""
        self.epoch, self.offset = epoch, offset

    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """(file, row) for every sample of an epoch, all ranks together."""
        rng = np.random.default_rng([self.cfg.seed, epoch])
        order: list[tuple[int, int]] = []
        for f in rng.permutation(len(self.files)):
            w = self.weights[f]
            repeats = np.floor(w).astype(int) + (rng.random(len(w)) < w - np.floor(w))
            block = [(int(f), r) for r in self.rows[f] for _ in range(repeats[r])]
            order += [block[i] for i in rng.permutation(len(block))]
        return order

    def rank_order(self, epoch: int) -> list[tuple[int, int]]:
        order = self.epoch_order(epoch)
        return order[self.rank::self.world_size][: len(order) // self.world_size]

    def __len__(self) -> int:
        return len(self.rank_order(self.epoch))

    def epoch_length(self, epoch: int) -> int:
        """Samples of `epoch` for this rank (epochs differ when bucket weights are fractional)."""
        if epoch not in self._lengths:
            self._lengths[epoch] = len(self.rank_order(epoch))
        return self._lengths[epoch]

    def __iter__(self) -> Iterator[dict]:
        """From (epoch, offset) to the end of that epoch, or on through every later epoch when
        `spans_epochs` (one DataLoader, and its workers, for a whole run)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, start, j = self.epoch, self.offset, 0
        while True:
            mine = self.rank_order(epoch)
            for k in range(start, len(mine)):
                if j % workers == worker:
                    f, r = mine[k]
                    place = k * self.world_size + self.rank  # in epoch_order: the same on any number of ranks
                    row = self._row(f, r)
                    sample = self.sample(row, np.random.default_rng([self.cfg.seed, epoch, place])) \
                        if self.cache is None else self.cache.sample(row["clip_id"])
                    yield {**sample, "place": (epoch, place)}
                j += 1
            if not self.spans_epochs or not mine:
                return
            epoch, start = epoch + 1, 0

    def _row(self, f: int, r: int) -> dict:
        if f not in self._tables:
            names = pq.read_schema(self.files[f], filesystem=self.fs).names
            table = pq.read_table(self.files[f], columns=[c for c in COLUMNS if c in names], filesystem=self.fs)
            self._tables[f] = [exported_clip(row, self.files[f]) for row in table.to_pylist()]
            while len(self._tables) > self.cache_shards:
                self._tables.popitem(last=False)
        self._tables.move_to_end(f)
        return self._tables[f][r]

    def sample(self, row: dict, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        a, ref, targets, clip_buckets = plan_clip(row, cfg, rng)
        source = source_path(row)
        frames = decode_frames(source, row["start_s"] + a, row["fps"], cfg.num_frames, cfg.frame_stride)
        ref_frame = decode_frames(source, row["start_s"] + ref.t, row["fps"], 1, 1)[0]
        identity = {"id_face": torch.from_numpy(identity_face(ref_frame, ref, cfg.face_margin)),
                    "id_embedding": torch.tensor(ref.embedding or (), dtype=torch.float32)}
        if cfg.id_references > 1:
            identity = self.identity_references(row, reference_set(row, cfg, a, ref, targets), ref_frame)
        return {
            "clip_id": row["clip_id"],
            "frames": torch.from_numpy(np.stack([fit(f, cfg.width, cfg.height) for f in frames])),
            "face": torch.from_numpy(crop_face(ref_frame, ref.box, cfg.face_margin, cfg.face_size)),
            **identity,
            "caption": row.get("caption") or "",
            "target_buckets": sorted(targets),
            "ref_bucket": ref.bucket,
            "clip_buckets": sorted(clip_buckets),
        }

    def identity_references(self, row: dict, refs: list[FacePose], first: np.ndarray) -> dict:
        """Several reference faces for the identity expert, padded to `data.id_references`:
        `id_face` (N, 112, 112, 3), `id_mask` (N,) True where a face is present, `id_has` (N,) True where
        its precomputed embedding is used, `id_embedding` (N, dim) (zeros elsewhere; (N, 0) when none)."""
        n = self.cfg.id_references
        faces = np.zeros((n, ARCFACE_SIZE, ARCFACE_SIZE, 3), np.uint8)
        for i, p in enumerate(refs):
            frame = first if i == 0 else decode_frames(source_path(row), row["start_s"] + p.t, row["fps"], 1, 1)[0]
            faces[i] = identity_face(frame, p, self.cfg.face_margin)
        dim = max((len(p.embedding) for p in refs if p.embedding), default=0)
        emb = torch.zeros(n, dim)
        has = torch.zeros(n, dtype=torch.bool)
        for i, p in enumerate(refs):
            if p.embedding and len(p.embedding) == dim:
                emb[i], has[i] = torch.tensor(p.embedding), True
        mask = torch.arange(n) < len(refs)
        return {"id_face": torch.from_numpy(faces), "id_embedding": emb, "id_mask": mask, "id_has": has}


def collate(samples: list[dict]) -> dict:
    """Stack tensors; identity embeddings are kept only where a row had one (`has_id`)."""
    if "latents" in samples[0]:  # cached samples
        return collate_cached(samples)
    if "id_mask" in samples[0]:  # several reference faces per sample (`data.id_references` > 1)
        return _collate_references(samples)
    has_id = torch.tensor([s["id_embedding"].numel() > 0 for s in samples])
    dim = max(s["id_embedding"].numel() for s in samples)
    stacked = ("frames", "face", "id_face")
    batch = {k: [s[k] for s in samples] for k in samples[0] if k not in (*stacked, "id_embedding")}
    batch.update({k: torch.stack([s[k] for s in samples]) for k in stacked})
    batch["has_id"] = has_id
    batch["id_embedding"] = torch.stack([s["id_embedding"] if s["id_embedding"].numel() else torch.zeros(dim)
                                         for s in samples]) if dim else None
    return batch


def _collate_references(samples: list[dict]) -> dict:
    """`collate` for samples with several reference faces: `id_face` (B, N, ...), `id_mask` (B, N),
    `has_id` (B, N) (precomputed embedding used), `id_embedding` (B, N, dim) or None."""
    stacked = ("frames", "face", "id_face", "id_mask")
    skip = (*stacked, "id_embedding", "id_has")
    batch = {k: [s[k] for s in samples] for k in samples[0] if k not in skip}
    batch.update({k: torch.stack([s[k] for s in samples]) for k in stacked})
    dim = max(s["id_embedding"].shape[1] for s in samples)
    batch["has_id"] = torch.stack([s["id_has"] & (s["id_embedding"].shape[1] == dim) for s in samples])
    batch["id_embedding"] = torch.stack([s["id_embedding"] if s["id_embedding"].shape[1] == dim else
                                         torch.zeros(len(s["id_has"]), dim) for s in samples]) if dim else None
    return batch
