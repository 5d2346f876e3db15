"""Face Constraints on real footage: detection, pose signs, rejects with reasons."""

import cv2
import numpy as np
import pytest

from lafid import media
from lafid.stages.face_constraints import FaceConstraints

from conftest import clip_item, run_stage

LOOSE = {"sample_fps": 5.0, "min_yaw_range": 0.0, "min_blur": 0.0}


@pytest.fixture(scope="module")
def face_stage():
    return FaceConstraints(LOOSE)


def analyse(stage, path):
    (item,) = run_stage(stage, [clip_item(path)])
    return item


def test_carphone_is_kept_with_a_face_in_nearly_every_frame(make_video, carphone, face_stage):
    path = make_video("carphone", lambda: carphone, 29.97)
    item = analyse(face_stage, path)
    c = item.columns
    assert not item.rejected, item.reject
    # the stage writes exactly the columns and work fields it declares
    assert set(c) - set(clip_item(path).columns) == set(FaceConstraints.writes)
    assert set(item.work) == set(FaceConstraints.writes_work)
    assert len(c["frame_t"]) == 20  # 4 s at 5 fps
    assert c["face_ratio"] >= 0.95
    assert c["single_face_ratio"] >= 0.95
    assert 0.05 < c["face_area_median"] < 0.5
    assert not np.isnan(c["frame_yaw"]).any()
    assert c["pose_bucket"] == "frontal"
    # the tracked face crop and landmarks are handed on for the identity stage
    frame = item.work["frames"][0]
    face = frame["faces"][frame["tracked"]]
    assert face["crop"].shape == (224, 224, 3) and face["landmarks5"].shape == (5, 2)


def test_frame_kps_lie_in_the_face_box_with_eyes_above_the_mouth(make_video, carphone, face_stage):
    c = analyse(face_stage, make_video("carphone", lambda: carphone, 29.97)).columns
    kps = np.array(c["frame_kps"], dtype=np.float32).reshape(-1, 5, 2)  # a mesh on every frame: no nulls
    box = np.array(c["frame_box"], dtype=np.float32)[:, None]
    assert len(kps) == len(c["frame_t"])
    assert ((kps >= box[..., :2]) & (kps <= box[..., 2:])).all()
    eyes, nose, mouth = kps[:, :2], kps[:, 2], kps[:, 3:]
    assert (eyes[..., 1].max(1) < nose[:, 1]).all() and (nose[:, 1] < mouth[..., 1].min(1)).all()
    assert (eyes[:, 0, 0] < eyes[:, 1, 0]).all() and (mouth[:, 0, 0] < mouth[:, 1, 0]).all()  # image-left first


def test_mirrored_footage_flips_the_sign_of_yaw(make_video, carphone, face_stage):
    yaw = np.array(analyse(face_stage, make_video("carphone", lambda: carphone, 29.97)).columns["frame_yaw"])
    mirrored = np.array(analyse(face_stage, make_video("carphone_mirror", lambda: media.mirror(carphone), 29.97))
                        .columns["frame_yaw"])
    assert np.corrcoef(yaw, mirrored)[0, 1] < -0.9
    turned = np.abs(yaw) > 3
    assert turned.sum() >= 5
    assert np.mean(np.sign(yaw[turned]) != np.sign(mirrored[turned])) >= 0.9


@pytest.mark.parametrize("theta", [20.0, -15.0])
def test_in_plane_rotation_moves_roll_by_theta(make_video, face_stage, theta):
    frames = media.still(media.astronaut(), 1.0)
    base = np.nanmedian(analyse(face_stage, make_video("astronaut", lambda: frames)).columns["frame_roll"])
    rotated = analyse(face_stage, make_video(f"astronaut_rot{theta:+.0f}", lambda: media.rotate(frames, theta)))
    # a counter-clockwise image rotation tilts the head anticlockwise: roll decreases by theta
    assert np.nanmedian(rotated.columns["frame_roll"]) - base == pytest.approx(-theta, abs=3.0)


def test_no_face_footage_is_rejected_with_reason(make_video, face_stage):
    item = analyse(face_stage, make_video("no_face", lambda: media.no_face_frames(2.0)))
    assert item.rejected and item.reject.reason == "no_face"
    assert item.columns["face_ratio"] == 0.0


def test_small_and_blurry_faces_are_rejected(make_video, carphone):
    strict = FaceConstraints({**LOOSE, "min_face_area": 0.05, "min_blur": 30.0})
    small = make_video("astronaut_small", lambda: media.shrink(media.still(media.astronaut(), 1.0, size=512), 0.4))
    blurred = make_video("carphone_blur", lambda: media.blur(carphone, 2.0), 29.97)
    small_item, blur_item = run_stage(strict, [clip_item(small), clip_item(blurred)])
    assert small_item.reject.reason == "small_face", small_item.reject
    assert blur_item.reject.reason in {"blurry_face", "face_missing"}, blur_item.reject
    sharp = run_stage(strict, [clip_item(make_video("carphone", lambda: carphone, 29.97))])[0]
    assert not sharp.rejected
    assert sharp.columns["blur_median"] > blur_item.columns["blur_median"]


def test_static_face_filter_uses_yaw_range(make_video, carphone):
    still_face = make_video("astronaut", lambda: media.still(media.astronaut(), 1.0))
    stage = FaceConstraints({**LOOSE, "min_yaw_range": 8.0})
    moving, static = run_stage(stage, [clip_item(make_video("carphone", lambda: carphone, 29.97)),
                                       clip_item(still_face)])
    assert not moving.rejected, moving.reject
    assert static.reject.reason == "static_face"


def test_two_faces_are_counted_and_rejected(make_video):
    def pair():
        left = media.still(media.astronaut(), 1.0)
        right = media.still(media.grace_hopper(), 1.0)
        return [np.concatenate([a, b], axis=1) for a, b in zip(left, right)]

    (item,) = run_stage(FaceConstraints(LOOSE), [clip_item(make_video("two_faces", pair))])
    assert item.reject.reason == "multiple_faces"
    assert max(item.columns["frame_face_count"]) == 2


def _beside(talk, portrait, portrait_left: bool):
    """Real two-person frames: the carphone man (larger) beside a smaller still portrait."""
    out = []
    for f in talk:
        man = cv2.resize(f, (320, 262), interpolation=cv2.INTER_CUBIC)
        side = np.full((262, 200, 3), 128, np.uint8)
        side[31:231, 0:200] = cv2.resize(portrait, (200, 200), interpolation=cv2.INTER_AREA)
        out.append(np.concatenate([side, man] if portrait_left else [man, side], axis=1))
    return out


def test_the_tracked_face_need_not_be_the_first_detection(make_video, carphone):
    """Two real faces in frame: the talking man is followed whatever order the detector lists them in."""
    stage = FaceConstraints({**LOOSE, "min_single_face_ratio": 0.0})
    not_first = 0
    for portrait_left in (True, False):
        name = f"carphone_beside_hopper_{'left' if portrait_left else 'right'}"
        path = make_video(name, lambda: _beside(carphone, media.grace_hopper(), portrait_left), 29.97)
        (item,) = run_stage(stage, [clip_item(path)])
        assert not item.rejected, item.reject
        c, frames = item.columns, item.work["frames"]
        assert max(c["frame_face_count"]) == 2
        lo, hi = (200 / 520, 1.0) if portrait_left else (0.0, 320 / 520)  # the man's horizontal extent
        boxes = np.array(c["frame_box"], np.float32)
        assert ((boxes[:, 0] >= lo - 0.02) & (boxes[:, 2] <= hi + 0.02)).all(), boxes
        for box, f in zip(boxes, frames):  # the hand-off names the same face as the columns
            np.testing.assert_allclose(f["faces"][f["tracked"]]["box"], box)
        not_first += sum(f["tracked"] != 0 for f in frames)
    assert not_first > 0, "the detector listed the man first every time: the test would not cover that case"
