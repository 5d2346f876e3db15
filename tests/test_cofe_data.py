"""CoFE shard dataset: disjoint splits over ranks x workers, pose-aware references, resume, weights,
ArcFace-aligned identity faces."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from insightface.utils.face_align import arcface_dst
from torch.utils.data import DataLoader

from lafid import media
from lafid.cofe.config import DataConfig
from lafid.cofe.data import ClipDataset, collate, crop_face, decode_frames, frame_poses, identity_face
from lafid.face.pose import five_points
from lafid.schema import CLIP_SCHEMA, clip_row
from lafid.stages.face_constraints import FaceConstraints
from cofe_fixtures import pose_shards  # noqa: F401  (fixture)

from conftest import clip_item, run_stage


def config(shards, **kw) -> DataConfig:
    return DataConfig(shards=[str(shards)], num_frames=5, frame_stride=2, height=32, width=32, face_size=56, **kw)


def test_no_clip_twice_across_two_ranks_by_two_workers_and_reference_pose_differs(pose_shards):  # noqa: F811
    shards, rows = pose_shards
    seen, multi = [], 0
    for rank in range(2):
        ds = ClipDataset(config(shards), rank=rank, world_size=2)
        for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate):
            seen += batch["clip_id"]
            assert batch["frames"].shape[1:] == (5, 32, 32, 3) and batch["face"].shape[1:] == (56, 56, 3)
            assert batch["id_face"].shape[1:] == (112, 112, 3)  # rows without frame_kps: box crops
            for targets, ref, clip in zip(batch["target_buckets"], batch["ref_bucket"], batch["clip_buckets"]):
                if len(clip) > 1:
                    multi += 1
                    assert ref not in targets, (ref, targets, clip)
    assert len(seen) == len(set(seen)) == len(rows)
    assert multi >= len(rows) // 2  # the rule was exercised, not vacuous


def test_resume_position_continues_the_same_samples(pose_shards):  # noqa: F811
    shards, _ = pose_shards
    ds = ClipDataset(config(shards, seed=3))
    ds.set_position(epoch=1, offset=0)
    full = list(ds)
    ds.set_position(epoch=1, offset=5)
    tail = list(ds)
    assert [s["clip_id"] for s in tail] == [s["clip_id"] for s in full[5:]]
    assert all(torch.equal(a["face"], b["face"]) and torch.equal(a["frames"], b["frames"])
               for a, b in zip(tail, full[5:]))
    ds.set_position(epoch=2, offset=0)
    assert [s["clip_id"] for s in ds] != [s["clip_id"] for s in full]  # reshuffled per epoch


def test_pose_bucket_weights_oversample_large_yaw(pose_shards):  # noqa: F811
    shards, rows = pose_shards
    weighted = ClipDataset(config(shards, bucket_weights={"left": 3.0, "right": 2.5}))
    with_left = {r["clip_id"] for r in rows if "left" in r["pose_buckets"]}
    order = weighted.epoch_order(0)
    counts = {}
    for f, r in order:
        counts[(f, r)] = counts.get((f, r), 0) + 1
    assert len(counts) == len(rows) and sum(counts.values()) == len(order)
    assert all(c == 3 for c in counts.values() if c > 1) and sum(c == 3 for c in counts.values()) == len(with_left)
    uniform = ClipDataset(config(shards))
    assert len(uniform.epoch_order(0)) == len(rows) < len(order)


def test_precomputed_identity_matches_the_reference_face(pose_shards):  # noqa: F811
    shards, rows = pose_shards
    by_id = {r["clip_id"]: r for r in rows}
    for s in ClipDataset(config(shards)):
        row = by_id[s["clip_id"]]
        if row.get("id_rep_embeddings"):
            match = [np.allclose(s["id_embedding"].numpy(), e) for e in row["id_rep_embeddings"]]
            assert sum(match) == 1
        else:
            assert s["id_embedding"].numel() == 0
    other_backend = ClipDataset(config(shards, id_backend="dlib"))
    assert all(s["id_embedding"].numel() == 0 for s in other_backend)


def test_shards_from_a_url_or_file_list(pose_shards):  # noqa: F811
    shards, rows = pose_shards
    files = sorted(str(p) for p in shards.glob("clips-*.parquet"))
    assert len(ClipDataset(config(f"file://{shards}"))) == len(rows)
    assert len(ClipDataset(DataConfig(shards=files[:2]))) == 8


@pytest.fixture(scope="module")
def curated_carphone(tmp_path_factory):
    """A shard row written from the face stage's own columns on real footage (frame_kps included)."""
    root = tmp_path_factory.mktemp("cofe_kps")
    path = media.write_video(str(root / "carphone.mp4"), media.carphone_frames(), 29.97)
    (item,) = run_stage(FaceConstraints({"sample_fps": 2.0, "min_blur": 0.0}), [clip_item(path)])
    (root / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist([clip_row(item)], schema=CLIP_SCHEMA), root / "shards" / "clips-0000.parquet")
    return root / "shards", pq.read_table(root / "shards" / "clips-0000.parquet").to_pylist()[0]


def mesh_five_points(face: np.ndarray) -> np.ndarray:
    """5 landmarks found afresh by the face mesh on a face image (padded: the mesh's detector wants context)."""
    import mediapipe as mp

    pad = face.shape[0] // 2
    big = cv2.copyMakeBorder(face, pad, pad, pad, pad, cv2.BORDER_CONSTANT)
    h, w = big.shape[:2]
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True) as mesh:
        (found,) = mesh.process(big).multi_face_landmarks
    return five_points(np.array([(p.x * w, p.y * h, p.z * w) for p in found.landmark], np.float32)) - pad


def test_identity_face_is_arcface_aligned_by_the_shard_landmarks(curated_carphone):
    shards, row = curated_carphone
    assert all(k is not None and len(k) == 10 for k in row["frame_kps"])
    ds = ClipDataset(config(shards))
    errors = []
    for epoch in range(4):  # a different reference frame each epoch
        ds.set_position(epoch, 0)
        (sample,) = list(ds)
        face = sample["id_face"].numpy()
        assert face.shape == (112, 112, 3)
        errors.append(np.abs(mesh_five_points(face) - arcface_dst).max(1))
    errors = np.array(errors)
    # landmarks found afresh on the aligned face sit on ArcFace's template, eyes closest
    assert np.median(errors[:, :2]) < 4 and np.median(errors) < 6, errors

    pose = frame_poses(row)[0]
    frame = decode_frames(row["source"], row["start_s"] + pose.t, row["fps"], 1, 1)[0]
    box_face = crop_face(frame, pose.box, 0.3, 112)
    assert np.median(np.abs(mesh_five_points(box_face) - arcface_dst).max(1)) > 3 * np.median(errors)
    # a frame without a mesh falls back to the box crop
    assert np.array_equal(identity_face(frame, replace(pose, kps=None), 0.3), box_face)
