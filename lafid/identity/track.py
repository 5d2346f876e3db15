"""Follow one person through a clip's sampled frames and measure identity stability.

The track is anchored on the clip's dominant identity (the densest group of
upstream-tracked faces), never on the previous frame alone, so a slow cross-fade
into another person cannot drag the track along with it. In every frame the face
closest to that anchor is taken if it is the same person by the backend's
threshold (a face still overlapping the last position gets `slack` extra); frames
whose faces are all someone else are "other" frames and each run of them is a
track break. A second, larger person in the frame therefore never replaces the
tracked one, and a cut the shot detector missed shows up as a break.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lafid.identity.encoders import centroid, pairwise


@dataclass
class Candidate:
    """One embedded face of one sampled frame."""

    face: int  # index into the frame's faces
    box: np.ndarray  # x0, y0, x1, y1, normalised
    embedding: np.ndarray
    upstream: bool  # the face Face Constraints tracked


@dataclass
class Track:
    chosen: list[int | None]  # per frame: position in that frame's candidates, None if the person is not there
    nearest: np.ndarray  # per frame: smallest distance of any face to the anchor (NaN: no face)
    other: np.ndarray  # per frame: faces present, none of them the person
    breaks: int  # runs of "other" frames

    @property
    def first_other(self) -> int | None:
        hits = np.flatnonzero(self.other)
        return int(hits[0]) if hits.size else None


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def anchor(frames: list[list[Candidate]], metric: str, threshold: float) -> np.ndarray | None:
    """Centroid of the largest same-person group among upstream-tracked faces (all faces if none)."""
    pool = [c for cands in frames for c in cands if c.upstream] or [c for cands in frames for c in cands]
    if not pool:
        return None
    emb = np.stack([c.embedding for c in pool])
    close = pairwise(metric, emb, emb) <= threshold
    seed = int(np.argmax(close.sum(1)))  # first of the densest: earliest on ties
    return centroid(metric, emb[close[seed]])


def follow(frames: list[list[Candidate]], metric: str, threshold: float,
           slack: float = 1.1, min_iou: float = 0.5) -> Track:
    """Pick the person's face in every frame by distance to the anchor plus box overlap."""
    n = len(frames)
    chosen: list[int | None] = [None] * n
    nearest = np.full(n, np.nan, np.float32)
    other = np.zeros(n, bool)
    ref = anchor(frames, metric, threshold)
    last_box = None
    for i, cands in enumerate(frames):
        if not cands:
            continue
        dist = pairwise(metric, ref, np.stack([c.embedding for c in cands]))[0]
        overlap = np.array([box_iou(c.box, last_box) if last_box is not None else 0.0 for c in cands])
        nearest[i] = dist.min()
        ok = (dist <= threshold) | ((dist <= threshold * slack) & (overlap >= min_iou))
        if not ok.any():
            other[i] = True
            continue
        cost = np.where(ok, dist / threshold - overlap, np.inf)
        chosen[i] = int(np.argmin(cost))
        last_box = cands[chosen[i]].box
    breaks = int(np.sum(other[1:] & ~other[:-1]) + other[0]) if n else 0
    return Track(chosen, nearest, other, breaks)


def representatives(yaw: np.ndarray, first: int, count: int, min_gap: float) -> list[int]:
    """Up to `count` frames spread over yaw, starting at `first`: greedy farthest-point on yaw."""
    picked = [first]
    known = np.flatnonzero(~np.isnan(yaw))
    while len(picked) < count and known.size:
        gap = np.min(np.abs(yaw[known, None] - yaw[None, picked]), axis=1)
        best = int(np.argmax(gap))
        if gap[best] < min_gap:
            break
        picked.append(int(known[best]))
    return picked


def reference(yaw: np.ndarray, blur: np.ndarray, frontal_tolerance: float = 10.0) -> int:
    """The sharpest face among the most frontal ones (|yaw| within tolerance of the smallest)."""
    absyaw = np.abs(yaw)
    if np.isnan(absyaw).all():
        return int(np.argmax(blur))
    frontal = absyaw <= np.nanmin(absyaw) + frontal_tolerance
    return int(np.argmax(np.where(frontal, blur, -np.inf)))
