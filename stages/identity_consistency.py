"""Identity Consistency: the clip's subject is one person throughout, across poses.

Verifies the subject track Face Constraints chose (`lafid.face.track`); it never
chooses a face again. Reads the subject's faces from the hand-off in
`item.work["frames"]` (no decoding, no detection), embeds them with the recipe's
backend (ArcFace: a model pack under `model_dir`, else the embedded MobileFaceNet;
dlib as the fallback), batched across the clips of a batch. Per clip it stores the
reference face (most frontal, sharpest), pose-diverse representative embeddings,
and distances of every frame to the reference and to the track centroid, split by
frontal vs large yaw. Verification is pose-aware (`lafid.face.track.verify`): each
face against the subject's representatives near its yaw, or the track's recent
faces where the person turned beyond them. Clips where another person takes over
the track (a missed cut, a cross-dissolve, a second person the track jumped to) or
with too many faces far from the subject at their pose are rejected with a reason.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from lafid.face.embed import ArcFaceEncoder, centroid, open_encoder, pairwise
from lafid.face.track import reference, representatives, subject, verify
from lafid.item import Item
from lafid.schema import IDENTITY, names
from lafid.stage import Resources, Stage, StageParams


class IdentityConsistencyParams(StageParams):
    backend: Literal["auto", "arcface", "dlib"] = Field(
        "auto", description="identity encoder; auto = arcface (model_dir pack, else the embedded w600k_mbf), "
                    "dlib when no ArcFace model is found")
    model_dir: str = Field(ArcFaceEncoder.DEFAULT_DIR,
                           description="insightface models folder (antelopev2/ or buffalo_l/ inside) or a pack folder; "
                                       "takes precedence over the embedded model")
    batch_size: int = Field(32, ge=1, description="faces per encoder call")
    embed_every: int = Field(1, ge=1, description="embed every Nth sampled frame: identity needs fewer frames than lip activity")
    max_distance: float | None = Field(None, gt=0, description="same-person distance; None = the backend's own")
    track_slack: float = Field(1.1, ge=1, description="a face overlapping the last box may be this much farther")
    track_min_iou: float = Field(0.5, ge=0, le=1, description="box overlap that earns the slack")
    max_track_breaks: int = Field(0, ge=0, description="keep: times another person may take over the subject track")
    max_far_ratio: float = Field(0.1, ge=0, le=1, description="keep: share of face frames beyond max_distance "
                                 "from the subject at their pose (takeovers included)")
    rep_yaw_window: float = Field(15.0, ge=0, description="a face is judged against the representatives within "
                                  "this many degrees of its yaw; a face farther from all of them (the person "
                                  "turned) may match the track's recent faces instead")
    recent_frames: int = Field(3, ge=1, description="recent verified faces a turned face may match")
    large_pose_yaw: float = Field(45.0, ge=0, le=90, description="|yaw| counted as large pose")
    rep_count: int = Field(4, ge=1, description="representative embeddings kept, reference included")
    rep_min_yaw_gap: float = Field(10.0, ge=0, description="degrees a new representative must add")


class IdentityConsistency(Stage):
    name = "identity_consistency"
    Params = IdentityConsistencyParams
    default_resources = Resources(cpus=1)

    reads_work = ("frames",)
    writes = names(IDENTITY)
    # The same-person distance drives track verification (which face is the subject's), so it is measured;
    # batch_size changes no result but is not a threshold either.
    THRESHOLDS = frozenset({"max_track_breaks", "max_far_ratio"})
    MEASURE_PARAMS = frozenset({"backend", "model_dir", "batch_size", "embed_every", "max_distance", "track_slack",
                                "track_min_iou", "rep_yaw_window", "recent_frames", "large_pose_yaw", "rep_count",
                                "rep_min_yaw_gap"})
    DECISIONS = frozenset({"identity_switch", "inconsistent_identity"})
    DECIDES_ON = ("id_threshold", "id_track_breaks", "id_far_ratio", "id_switch_t", "id_switch_dist",
                  "id_other_frames", "id_same_frames", "id_track_dist_max")

    def setup(self) -> None:
        p: IdentityConsistencyParams = self.params
        self.encoder = open_encoder(p.backend, p.model_dir, batch_size=p.batch_size,
                                    threads=self.resources.threads, use_gpu=self.resources.gpus > 0)
        self.threshold = p.max_distance or self.encoder.threshold

    def process(self, items: list[Item]) -> list[Item]:
        chips, owners = [], []
        for n, item in enumerate(items):
            if "frames" not in item.work:
                raise ValueError("no face frames in the hand-off: run face_constraints before identity_consistency")
            for i, face in enumerate(subject(item.work["frames"])):
                if face is None or i % self.params.embed_every:
                    continue
                chip = self.encoder.align(face["crop"], face["landmarks5"])
                if chip is not None:
                    chips.append(chip)
                    owners.append((n, i))
        embeddings = self.encoder.embed(chips)
        per_item: list[dict] = [{} for _ in items]
        for (n, i), chip, emb in zip(owners, chips, embeddings):
            per_item[n][i] = (chip, emb)
        return [self._judge(item, faces) for item, faces in zip(items, per_item)]

    def _judge(self, item: Item, embedded: dict) -> Item:
        p: IdentityConsistencyParams = self.params
        metric, thr = self.encoder.metric, self.threshold
        frames = item.work["frames"]
        faces_all = subject(frames)
        boxes = [None if f is None else np.asarray(f["box"], np.float32) for f in faces_all]
        track = verify([embedded[i][1] if i in embedded else None for i in range(len(frames))], boxes,
                       [np.nan if f is None else f["yaw"] for f in faces_all],
                       [0.0 if f is None else f["blur"] for f in faces_all],
                       metric, thr, p.track_slack, p.track_min_iou, p.rep_count, p.rep_min_yaw_gap,
                       p.rep_yaw_window, p.recent_frames)
        matched = np.flatnonzero(track.same).tolist()
        if not matched:
            return item.drop(self.name, "no_identity", "no face of the subject could be embedded")
        faces = [faces_all[i] for i in matched]
        emb = np.stack([embedded[i][1] for i in matched])
        yaw = np.array([f["yaw"] for f in faces], np.float32)
        ref = reference(yaw, np.array([f["blur"] for f in faces]))
        frame_dist = np.full(len(frames), np.nan, np.float32)
        known = sorted(embedded)
        frame_dist[known] = pairwise(metric, emb[ref], np.stack([embedded[i][1] for i in known]))[0]
        d_ref = frame_dist[matched]
        d_centroid = pairwise(metric, centroid(metric, emb), emb)[0]
        n_other = int(track.other.sum())
        far_ratio = float(np.mean(track.dist[np.isfinite(track.dist)] > thr))  # takeovers and slack-held faces
        large, frontal = np.abs(yaw) >= p.large_pose_yaw, np.abs(yaw) < p.large_pose_yaw  # NaN yaw: neither
        reps = representatives(yaw, ref, p.rep_count, p.rep_min_yaw_gap)
        t = [frames[i]["t"] for i in matched]
        item.columns.update({
            "id_backend": self.encoder.name,
            "id_model_sha256": self.encoder.model_sha256,
            "id_metric": metric,
            "id_threshold": thr,
            "id_ref_embedding": emb[ref].tolist(),
            "id_ref_t": float(t[ref]),
            "id_ref_box": boxes[matched[ref]].tolist(),
            "id_ref_face": _png(embedded[matched[ref]][0]),
            "id_rep_embeddings": [emb[k].tolist() for k in reps],
            "id_rep_yaw": [float(yaw[k]) for k in reps],
            "id_rep_t": [float(t[k]) for k in reps],
            "id_frame_dist": frame_dist.tolist(),
            "id_frame_box": [boxes[i].tolist() if track.same[i] else None for i in range(len(frames))],
            "id_dist_ref_max": float(d_ref.max()),
            "id_dist_ref_median": float(np.median(d_ref)),
            "id_dist_centroid_max": float(d_centroid.max()),
            "id_far_ratio": float(far_ratio),
            "id_dist_frontal_median": float(np.median(d_ref[frontal])) if frontal.any() else None,
            "id_dist_large_pose_median": float(np.median(d_ref[large])) if large.any() else None,
            "id_track_breaks": track.breaks,
            "id_other_frames": n_other,
            "id_same_frames": len(matched),
            "id_switch_t": float(frames[track.first_other]["t"]) if track.first_other is not None else None,
            "id_switch_dist": float(track.dist[track.first_other]) if track.first_other is not None else None,
            "id_track_dist_max": float(np.nanmax(track.dist)) if np.isfinite(track.dist).any() else None,
        })
        return self.conclude(item)[0]

    def decide(self, c: dict) -> tuple[str, str] | None:
        p: IdentityConsistencyParams = self.params
        thr = f"{c['id_threshold']:.4g}"
        if c["id_track_breaks"] > p.max_track_breaks:
            return ("identity_switch",
                    f"a person other than the clip's subject holds the track at t={c['id_switch_t']:.2f}s "
                    f"(distance {c['id_switch_dist']:.2f} > {thr}); {c['id_other_frames']} of "
                    f"{c['id_same_frames'] + c['id_other_frames']} face frames, {c['id_track_breaks']} break(s)")
        if c["id_far_ratio"] > p.max_far_ratio:
            return ("inconsistent_identity",
                    f"{c['id_far_ratio']:.0%} of face frames farther than {thr} from the subject at their pose "
                    f"(> {p.max_far_ratio:.0%}; max {c['id_track_dist_max']:.2f})")
        return None


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the reference face as PNG")
    return buf.tobytes()
