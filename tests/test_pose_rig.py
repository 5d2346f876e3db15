"""Large poses against ground truth: a real face on the rig (lafid.rig) turning to +-75 deg.

The default recipe (lafid180k) must keep a turning head with left and right pose
buckets and a yaw range near the truth, and identity must not reject it; a head
that never turns is `static_face`.
"""

import numpy as np
import pytest

from lafid import rig
from lafid.face.pose import head_pose
from lafid.recipe import load_recipe
from lafid.stages.face_constraints import FaceConstraints

from conftest import run_stage, video_item

FPS, SECONDS, PEAK = 20.0, 5.0, 75.0  # longer than the recipe's min_clip_s (3.3 s)


@pytest.fixture(scope="session")
def recipe_stages():
    shot, face, identity = load_recipe("lafid180k").build_stages()[:3]
    return shot, face, identity


@pytest.fixture(scope="session")
def turning(make_video):
    n = int(FPS * SECONDS)
    return make_video("rig_hopper_turning", lambda: rig.clip("hopper", rig.sweep(n, PEAK)), FPS)


@pytest.fixture(scope="session")
def turned_clip(recipe_stages, turning):
    shot, face, _ = recipe_stages
    clips = run_stage(shot, [video_item(turning)])
    assert len(clips) == 1 and not clips[0].rejected, [c.reject for c in clips]
    return run_stage(face, clips)[0]


def test_rig_angles_are_the_mesh_convention():
    """The rig's own 3D points read back the angles it was posed at (yaw/pitch exactly)."""
    head = rig.head("hopper")
    for yaw, pitch in [(0, 0), (60, 20), (-80, -30)]:
        points = head.verts[:468] @ rig.rotation(yaw, pitch, 0).T
        assert head_pose(points)[:2] == pytest.approx((yaw, pitch), abs=1e-6)


def test_default_recipe_keeps_a_turning_head_with_left_and_right(turned_clip):
    c = turned_clip.columns
    assert not turned_clip.rejected, turned_clip.reject
    assert {"left", "right"} <= set(c["pose_buckets"])
    assert c["yaw_range"] == pytest.approx(2 * PEAK, abs=10.0)
    assert c["yaw_min"] < -PEAK + 10 and c["yaw_max"] > PEAK - 10
    assert c["face_ratio"] == 1.0
    # every sampled frame against the rig's truth, not only the extremes (which the 75 deg flag bounds)
    truth = rig.sweep(int(FPS * SECONDS), PEAK)[np.round(np.array(c["frame_t"]) * FPS).astype(int)]
    error = np.abs(np.array(c["frame_yaw"]) - truth)
    assert np.mean(error) < 6.0 and np.mean(error < 15.0) >= 0.9, np.round(error, 1)  # measured: 4.1, 0.95
    assert np.mean(c["frame_yaw_beyond"]) < 0.4  # measured: 0.23 (frames past about 68 deg)


def test_the_old_detector_loses_the_turning_head(recipe_stages, turning):
    """Control: mediapipe detection + mesh yaw (the old default) does not keep it with both sides."""
    shot, face, _ = recipe_stages
    old = FaceConstraints({**face.params.model_dump(), "detector": "mediapipe", "min_det_score": 0.65})
    item = run_stage(old, run_stage(shot, [video_item(turning)]))[0]
    c = item.columns
    assert item.rejected or not {"left", "right"} <= set(c["pose_buckets"])
    assert c["abs_yaw_max"] < PEAK - 10  # mesh yaw reads low


def test_a_head_that_never_turns_is_static(recipe_stages, make_video):
    n = int(FPS * SECONDS)
    path = make_video("rig_hopper_still", lambda: rig.clip("hopper", np.full(n, 5.0)), FPS)
    shot, face, _ = recipe_stages
    item = run_stage(face, run_stage(shot, [video_item(path)]))[0]
    assert item.rejected and item.reject.reason == "static_face", item.reject
    assert item.columns["face_ratio"] == 1.0


def test_identity_stage_keeps_the_turning_head(recipe_stages, turned_clip):
    """ArcFace aligned on SCRFD's points of the face crop, each face judged against the subject's
    views near its own yaw: the profiles stay the same person, although the most turned faces
    lie beyond the calibrated bound from the frontal reference (measured up to 0.72 vs 0.67;
    docs/pose.md), which is why verification is pose-aware."""
    _, _, identity = recipe_stages
    (item,) = run_stage(identity, [turned_clip])
    assert not item.rejected, item.reject
    assert item.columns["id_far_ratio"] <= identity.params.max_far_ratio
