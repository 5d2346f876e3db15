"""Identity Consistency: keep clips that show one person throughout, across poses.

Reads the faces Face Constraints handed on in `item.work["frames"]` (no decoding,
no detection), embeds every face of every sampled frame with the recipe's backend
(ArcFace when its model directory exists, else dlib), batched across the clips
of a batch, and follows the clip's dominant person with `lafid.identity.track`.
Per clip it stores the reference face (most frontal, sharpest), pose-diverse
representative embeddings, and distances of every frame to the reference and to
the track centroid, split by frontal vs large yaw. Clips where another person
takes over (a missed cut, a cross-fade) or whose identity drifts are rejected
with a reason. The identity track's face index replaces `tracked` in the
hand-off so later stages read the same person.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
from pydantic import Field

from lafid.identity.encoders import ArcFaceEncoder, centroid, open_encoder, pairwise
from lafid.identity.track import Candidate, follow, reference, representatives
from lafid.item import Item
from lafid.stage import Resources, Stage, StageParams


class IdentityConsistencyParams(StageParams):
    backend: Literal["auto", "arcface", "dlib"] = Field(
        "auto", description="identity encoder; auto = arcface when model_dir holds a model, else dlib")
    model_dir: str = Field(ArcFaceEncoder.DEFAULT_DIR,
                           description="insightface models folder (antelopev2/ or buffalo_l/ inside) or a pack folder")
    batch_size: int = Field(32, ge=1, description="faces per encoder call")
    embed_every: int = Field(1, ge=1, description="embed every Nth sampled frame: identity needs fewer frames than lip activity")
    max_distance: float | None = Field(None, gt=0, description="same-person distance; None = the backend's own")
    track_slack: float = Field(1.1, ge=1, description="a face overlapping the last box may be this much farther")
    track_min_iou: float = Field(0.5, ge=0, le=1, description="box overlap that earns the slack")
    max_track_breaks: int = Field(0, ge=0, description="keep: times another person may take over the track")
    max_far_ratio: float = Field(0.1, ge=0, le=1, description="keep: share of face frames beyond max_distance")
    large_pose_yaw: float = Field(45.0, ge=0, le=90, description="|yaw| counted as large pose")
    rep_count: int = Field(4, ge=1, description="representative embeddings kept, reference included")
    rep_min_yaw_gap: float = Field(10.0, ge=0, description="degrees a new representative must add")


class IdentityConsistency(Stage):
    name = "identity_consistency"
    Params = IdentityConsistencyParams
    default_resources = Resources(cpus=1)

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
            for i, frame in enumerate(item.work["frames"]):
                if i % self.params.embed_every:
                    continue
                for j, face in enumerate(frame["faces"]):
                    chip = self.encoder.align(face["crop"], face["landmarks5"])
                    if chip is not None:
                        chips.append(chip)
                        owners.append((n, i, j))
        embeddings = self.encoder.embed(chips)
        per_item: list[dict] = [{} for _ in items]
        for (n, i, j), chip, emb in zip(owners, chips, embeddings):
            per_item[n][i, j] = (chip, emb)
        return [self._judge(item, faces) for item, faces in zip(items, per_item)]

    def _judge(self, item: Item, embedded: dict) -> Item:
        p: IdentityConsistencyParams = self.params
        metric, thr = self.encoder.metric, self.threshold
        frames = item.work["frames"]
        cands = [[Candidate(j, np.asarray(f["faces"][j]["box"]), embedded[i, j][1], j == f["tracked"])
                  for j in range(len(f["faces"])) if (i, j) in embedded] for i, f in enumerate(frames)]
        track = follow(cands, metric, thr, p.track_slack, p.track_min_iou)
        matched = [i for i, c in enumerate(track.chosen) if c is not None]
        if not matched:
            return item.drop(self.name, "no_identity", "no face could be embedded in any sampled frame")
        face_of = {i: cands[i][track.chosen[i]].face for i in matched}
        for i, frame in enumerate(frames):
            if i % p.embed_every == 0:  # frames not embedded keep Face Constraints' choice
                frame["tracked"] = face_of.get(i)
        faces = [frames[i]["faces"][face_of[i]] for i in matched]
        emb = np.stack([embedded[i, face_of[i]][1] for i in matched])
        yaw = np.array([f["yaw"] for f in faces], np.float32)
        ref = reference(yaw, np.array([f["blur"] for f in faces]))
        # every face to the reference: the person's face where tracked, else the nearest one
        to_ref = [pairwise(metric, emb[ref], np.stack([c.embedding for c in cs]))[0] if cs else None for cs in cands]
        frame_dist = [float("nan") if d is None else float(d.min() if c is None else d[c])
                      for d, c in zip(to_ref, track.chosen)]
        d_ref = np.array([frame_dist[i] for i in matched])
        d_centroid = pairwise(metric, centroid(metric, emb), emb)[0]
        n_other = int(track.other.sum())
        far_ratio = (n_other + int(np.sum(d_ref > thr))) / (len(matched) + n_other)
        large, frontal = np.abs(yaw) >= p.large_pose_yaw, np.abs(yaw) < p.large_pose_yaw  # NaN yaw: neither
        reps = representatives(yaw, ref, p.rep_count, p.rep_min_yaw_gap)
        t = [frames[i]["t"] for i in matched]
        item.columns.update({
            "id_backend": self.encoder.name,
            "id_metric": metric,
            "id_threshold": thr,
            "id_ref_embedding": emb[ref].tolist(),
            "id_ref_t": float(t[ref]),
            "id_ref_box": np.asarray(faces[ref]["box"], np.float32).tolist(),
            "id_ref_face": _png(embedded[matched[ref], face_of[matched[ref]]][0]),
            "id_rep_embeddings": [emb[k].tolist() for k in reps],
            "id_rep_yaw": [float(yaw[k]) for k in reps],
            "id_rep_t": [float(t[k]) for k in reps],
            "id_frame_dist": frame_dist,
            "id_frame_box": [np.asarray(frames[i]["faces"][face_of[i]]["box"], np.float32).tolist()
                             if i in face_of else None for i in range(len(frames))],
            "id_dist_ref_max": float(d_ref.max()),
            "id_dist_ref_median": float(np.median(d_ref)),
            "id_dist_centroid_max": float(d_centroid.max()),
            "id_far_ratio": float(far_ratio),
            "id_dist_frontal_median": float(np.median(d_ref[frontal])) if frontal.any() else None,
            "id_dist_large_pose_median": float(np.median(d_ref[large])) if large.any() else None,
            "id_track_breaks": track.breaks,
        })
        if track.breaks > p.max_track_breaks:
            k = track.first_other
            return item.drop(self.name, "identity_switch",
                             f"a person other than the clip's main one at t={frames[k]['t']:.2f}s "
                             f"(distance {track.nearest[k]:.2f} > {thr}); "
                             f"{n_other} of {len(matched) + n_other} face frames, {track.breaks} break(s)")
        if far_ratio > p.max_far_ratio:
            return item.drop(self.name, "inconsistent_identity",
                             f"{far_ratio:.0%} of face frames farther than {thr} from the reference "
                             f"(> {p.max_far_ratio:.0%}; max {d_ref.max():.2f})")
        return item


def _png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the reference face as PNG")
    return buf.tobytes()
