"""The clip's subject: one face track per clip, chosen once and verified by identity.

Face Constraints chooses the subject (`follow`): in every sampled frame the face
that overlaps the subject's last box, else the largest face. That choice is the
`tracked` index of each hand-off frame (`lafid.handoff`) and every per-frame
column it writes (`frame_box`, `frame_kps`, pose, `frame_mouth_open`): later
stages read this one track and never choose again.

Identity Consistency `verify`s it: the subject's faces are embedded, the track's
identity is the densest same-person group of them (its centroid is the anchor, so
a slow cross-fade cannot drag it along), and each subject face farther than the
backend's threshold from the anchor (`slack` more allowed while the box still
overlaps the last verified one) is a frame where someone else holds the track.
Each run of such frames is a takeover (a track break).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lafid.face.detect import iou
from lafid.face.embed import centroid, pairwise

FOLLOW_MIN_IOU = 0.3  # overlap with the subject's last box that keeps following it


def follow(boxes: list, previous, min_iou: float = FOLLOW_MIN_IOU) -> int | None:
    """Index of the subject's face among `boxes`: the one overlapping `previous` (the last
    subject box), else the largest; None when there is no face."""
    if not boxes:
        return None
    if previous is not None:
        overlap = [iou(b, previous) for b in boxes]
        best = int(np.argmax(overlap))
        if overlap[best] > min_iou:
            return best
    return int(np.argmax([max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1]) for b in boxes]))


def subject(frames: list[dict]) -> list[dict | None]:
    """The subject's face dict in each hand-off frame (None where the clip shows no face)."""
    return [None if f["tracked"] is None else f["faces"][f["tracked"]] for f in frames]


@dataclass
class Verification:
    same: np.ndarray   # per frame: the subject's face is the track's person
    other: np.ndarray  # per frame: the subject's face is someone else
    dist: np.ndarray   # per frame: distance of the subject's face to the anchor (NaN: not embedded)
    breaks: int        # runs of `other` frames: takeovers

    @property
    def first_other(self) -> int | None:
        hits = np.flatnonzero(self.other)
        return int(hits[0]) if hits.size else None


def anchor(embeddings: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    """Centroid of the largest same-person group (the first of the densest on ties)."""
    close = pairwise(metric, embeddings, embeddings) <= threshold
    seed = int(np.argmax(close.sum(1)))
    return centroid(metric, embeddings[close[seed]])


def verify(embeddings: list[np.ndarray | None], boxes: list, metric: str, threshold: float,
           slack: float = 1.1, min_iou: float = 0.5) -> Verification:
    """Check that one person holds the subject track; `embeddings[i]` is the subject's face in frame i."""
    n = len(embeddings)
    dist = np.full(n, np.nan, np.float32)
    same, other = np.zeros(n, bool), np.zeros(n, bool)
    known = [i for i, e in enumerate(embeddings) if e is not None]
    if known:
        ref = anchor(np.stack([embeddings[i] for i in known]), metric, threshold)
        dist[known] = pairwise(metric, ref, np.stack([embeddings[i] for i in known]))[0]
    last_box = None
    for i in known:
        near = dist[i] <= threshold
        held = last_box is not None and dist[i] <= threshold * slack and iou(boxes[i], last_box) >= min_iou
        if near or held:
            same[i], last_box = True, boxes[i]
        else:
            other[i] = True
    flags = other[known]
    breaks = int(np.sum(flags[1:] & ~flags[:-1]) + flags[0]) if known else 0
    return Verification(same, other, dist, breaks)


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
