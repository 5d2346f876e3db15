"""The clip's subject: one face track per clip, chosen once and verified by identity.

Face Constraints chooses the subject (`follow`): in every sampled frame the face
that overlaps the subject's last box, else the largest face. That choice is the
`tracked` index of each hand-off frame (`lafid.handoff`) and every per-frame
column it writes (`frame_box`, `frame_kps`, pose, `frame_mouth_open`): later
stages read this one track and never choose again.

Identity Consistency `verify`s it, pose-aware: the track's person is the densest
same-person group of its faces (so a slow cross-fade cannot drag it along), seen
through pose-spread representatives of that group (`representatives`, chosen as
the stored `id_rep_embeddings` are, over the track's faces). Each face is compared with the
representatives within `yaw_window` of its yaw; a face at a pose none covers (the
person turned away) is compared with the nearest in yaw and may instead match the
track's recent verified faces, so a turn is followed step by step, while a face at
a covered pose (a cross-dissolve, a missed cut to someone facing the same way)
must match that view of the person itself. A face farther than the threshold
(`slack` more allowed while the box overlaps the last verified one) is a frame
where someone else holds the track; each run of such frames is a takeover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lafid.face.detect import iou
from lafid.face.embed import pairwise

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
    dist: np.ndarray   # per frame: distance to the pose-nearest representative, or the recent faces where
                       # the pose is not covered (NaN: not embedded)
    breaks: int        # runs of two or more `other` faces: takeovers
    reps: list[int]    # frame indices of the representatives every face was compared with

    @property
    def first_other(self) -> int | None:
        hits = np.flatnonzero(self.other)
        return int(hits[0]) if hits.size else None


def densest_group(embeddings: np.ndarray, metric: str, threshold: float) -> np.ndarray:
    """Indices of the largest same-person group: the faces within `threshold` of the face with most such
    neighbours (the first of the densest on ties)."""
    close = pairwise(metric, embeddings, embeddings) <= threshold
    return np.flatnonzero(close[int(np.argmax(close.sum(1)))])


def verify(embeddings: list[np.ndarray | None], boxes: list, yaw, blur, metric: str, threshold: float,
           slack: float = 1.1, min_iou: float = 0.5, rep_count: int = 4, rep_min_yaw_gap: float = 10.0,
           yaw_window: float = 15.0, recent: int = 3) -> Verification:
    """Check that one person holds the subject track; `embeddings[i]` is the subject's face in frame i,
    `yaw[i]` / `blur[i]` its head yaw (NaN: unknown) and sharpness."""
    n = len(embeddings)
    dist = np.full(n, np.nan, np.float32)
    same, other = np.zeros(n, bool), np.zeros(n, bool)
    known = np.array([i for i, e in enumerate(embeddings) if e is not None], int)
    if not known.size:
        return Verification(same, other, dist, 0, [])
    emb = np.stack([embeddings[i] for i in known])
    yaw = np.asarray(yaw, np.float32)
    group = known[densest_group(emb, metric, threshold)]
    reps = [int(group[k]) for k in representatives(yaw[group], reference(yaw[group], np.asarray(blur)[group]),
                                                   rep_count, rep_min_yaw_gap)]
    rep_yaw = yaw[reps]
    d_reps = pairwise(metric, emb, np.stack([embeddings[r] for r in reps]))  # (known, reps)
    last_box, verified = None, []
    for row, i in enumerate(known):
        gap = np.abs(rep_yaw - yaw[i])
        near = gap <= yaw_window
        if np.isnan(gap).all():  # pose unknown: any view of the person
            d, covered = float(d_reps[row].min()), True
        elif near.any():  # the views of the person at this pose
            d, covered = float(d_reps[row, near].min()), True
        else:
            d, covered = float(d_reps[row, int(np.nanargmin(gap))]), False
        if not covered and verified:
            d = min(d, float(pairwise(metric, embeddings[i], np.stack([embeddings[j] for j in verified[-recent:]])).min()))
        dist[i] = d
        held = last_box is not None and d <= threshold * slack and iou(boxes[i], last_box) >= min_iou
        if d <= threshold or held:
            same[i], last_box = True, boxes[i]
            verified.append(i)
        else:
            other[i] = True
    return Verification(same, other, dist, takeovers(other[known]), reps)


def takeovers(flags: np.ndarray, min_run: int = 2) -> int:
    """Runs of at least `min_run` consecutive faces of someone else: one odd face between faces of
    the subject (a bad crop or alignment at a large pose) is no takeover; it counts as a far frame."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int(np.sum(ends - starts >= min_run))


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
