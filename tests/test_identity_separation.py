"""Telling similar people apart on real faces: the calibrated threshold, pose-aware verification
inside a clip (a person turning, a cross-dissolve), and clusters that do not chain."""

import cv2
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from lafid import devset, media
from lafid.face.embed import ArcFaceEncoder, pairwise
from lafid.face.track import takeovers, subject, verify
from lafid.identity import calibration as cal
from lafid.identity.cluster import cluster
from lafid.stage import StageWorker
from lafid.video import sample_frames
from lafid.stages.face_constraints import FaceConstraints
from lafid.stages.identity_consistency import IdentityConsistency
from lafid.stages.shot_split import ShotSplit

from conftest import clip_item, run_stage, video_item

SAME = ArcFaceEncoder.threshold
PREVIOUS_DEFAULT = 0.75  # the threshold before calibration (six people, closest pair 0.84)


@pytest.fixture(scope="module")
def faces():
    worker = StageWorker(FaceConstraints({"sample_fps": 4.0, "min_yaw_range": 0.0, "min_blur": 0.0,
                                          "min_single_face_ratio": 0.0, "min_face_area": 0.0}))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def encoder():
    return ArcFaceEncoder("/nonexistent")  # the embedded w600k_mbf


@pytest.fixture(scope="module")
def calibration(faces, encoder):
    """The calibration set of benchmarks/identity_calibration.py, embedded: (faces, embeddings, kept, pairs)."""
    try:
        root = devset.ensure()
    except devset.DevSetError as exc:
        pytest.fail(f"dev set unavailable: {exc}")
    found = cal.Faces()
    for path, person in cal.clip_paths(root).items():
        (item,) = faces.run([clip_item(path)])[0]
        found.add_track(person, path, subject(item.work["frames"]))
    cal.photo_faces(found)
    emb, kept = cal.embed(encoder, found)
    p = cal.pairs(emb, [found.person[i] for i in kept], np.array([found.yaw[i] for i in kept]), encoder.metric)
    return found, emb, kept, p


def test_closest_different_people_of_the_calibration_set_are_kept_apart(calibration):
    found, emb, kept, p = calibration
    a, b = p.closest
    people = [found.person[kept[a]], found.person[kept[b]]]
    assert len({found.person[i] for i in kept}) >= 30 and people[0] != people[1]
    d = float(pairwise("cosine", emb[a], emb[b])[0, 0])
    assert d == pytest.approx(p.impostor.min(), abs=1e-6)
    # the default is the threshold the calibration picks at FMR <= 1e-3 per pair of people
    assert SAME <= cal.threshold_at(p, 1e-3) < SAME + 0.01
    assert d > SAME and cal.rates(p, SAME)["fmr"] == 0.0
    assert len(set(cluster(emb[[a, b]], "cosine", SAME))) == 2  # two identities
    # control: the previous default matched them, so they ended as one identity
    assert d <= PREVIOUS_DEFAULT and len(set(cluster(emb[[a, b]], "cosine", PREVIOUS_DEFAULT))) == 1
    # the same people stay together: one man recorded twice, one man in two photos
    person = np.array([found.person[i] for i in kept])
    source = np.array([found.source[i] for i in kept])
    jon = person == "jon_peirce"
    first = jon & (source == source[jon][0])
    assert (first != jon).any()  # both recordings are in the set
    assert np.median(pairwise("cosine", emb[first], emb[jon & ~first])) < SAME
    yao = np.flatnonzero(person == "yao_ming")
    assert len(yao) == 2 and pairwise("cosine", emb[yao[0]], emb[yao[1]])[0, 0] < SAME
    assert cal.rates(p, SAME)["fnmr"] < 0.01


def test_a_chain_of_look_alikes_does_not_join_two_people(calibration, encoder):
    """A ~ B ~ C: B is a real blend of A's and C's faces, close to both; A and C are two people."""
    found, emb, kept, p = calibration
    person = [found.person[i] for i in kept]
    pick = {who: [kept[k] for k, x in enumerate(person) if x == who][:6] for who in ("carphone", "jon_peirce")}
    chips = {who: [encoder.align(found.crop[i], found.landmarks5[i]) for i in rows] for who, rows in pick.items()}
    blend = [cv2.addWeighted(a, 0.55, c, 0.45, 0) for a, c in zip(chips["carphone"], chips["jon_peirce"])]
    a, b, c = encoder.embed(chips["carphone"]), encoder.embed(blend), encoder.embed(chips["jon_peirce"])
    assert (np.diag(pairwise("cosine", a, b)) <= SAME).all() and (np.diag(pairwise("cosine", b, c)) <= SAME).all()
    assert (pairwise("cosine", a, c) > SAME).all()
    x = np.concatenate([a, b, c])
    labels = cluster(x, "cosine", SAME)
    assert not set(labels[:6]) & set(labels[12:])  # A and C never share a cluster
    # control: linking every pair within the threshold (single linkage) makes one identity of all three
    r, k = np.nonzero(pairwise("cosine", x, x) <= SAME)
    n, single = connected_components(coo_matrix((np.ones(len(r)), (r, k)), shape=(18, 18)), directed=False)
    assert n == 1 and single[0] == single[12]


def _plane_turn(image: np.ndarray, degrees: float) -> np.ndarray:
    """The photo as a plane turned about its vertical axis by `degrees` (perspective, focal 1.2 x width)."""
    h, w = image.shape[:2]
    f, th = 1.2 * w, np.radians(degrees)
    corners = np.array([[-w / 2, -h / 2], [w / 2, -h / 2], [w / 2, h / 2], [-w / 2, h / 2]], np.float32)
    z = corners[:, 0] * np.sin(th)
    moved = np.stack([corners[:, 0] * np.cos(th) * f / (f + z), corners[:, 1] * f / (f + z)], 1)
    centre = np.float32([w / 2, h / 2])
    m = cv2.getPerspectiveTransform(corners + centre, (moved + centre).astype(np.float32))
    return cv2.warpPerspective(image, m, (w, h), borderMode=cv2.BORDER_REPLICATE)


@pytest.fixture(scope="module")
def turning(make_video, faces, encoder):
    """Grace Hopper's photo turning from 0 to 88 degrees of yaw (known per frame; the detector follows it to
    about 70): the subject's embedded faces, their boxes and the true yaw."""
    photo = np.pad(cv2.resize(media.grace_hopper(), (320, 320)), ((40, 40), (40, 40), (0, 0)), mode="edge")
    angles = np.linspace(0, 88, 80)
    path = make_video("hopper_turning", lambda: [_plane_turn(photo, a) for a in angles], 12.0)
    sampler = StageWorker(FaceConstraints({"sample_fps": 12.0, "min_yaw_range": 0.0, "min_blur": 0.0,
                                           "min_single_face_ratio": 0.0, "min_face_area": 0.0}))
    try:
        (item,) = sampler.run([clip_item(path)])[0]
    finally:
        sampler.close()
    frames = item.work["frames"]
    track = subject(frames)
    # as the stage does: mesh landmarks, else SCRFD's (the mesh gives up on the most turned faces)
    chips = {i: encoder.align(f["crop"], f["landmarks5"]) for i, f in enumerate(track) if f is not None}
    seen = [i for i, c in chips.items() if c is not None]
    emb = encoder.embed([chips[i] for i in seen])
    yaw = np.interp([frames[i]["t"] for i in seen], np.arange(len(angles)) / 12.0, angles)
    boxes = [np.asarray(track[i]["box"]) for i in seen]
    return list(emb), boxes, yaw


def test_one_person_turning_away_is_kept(turning):
    """ArcFace keeps this planar turn within the calibrated radius of the frontal face, so the mechanism is
    shown at a stricter operating point where the turned faces fall outside the frontal face's radius."""
    emb, boxes, yaw = turning
    blur = np.ones(len(emb))
    assert len(emb) >= 50 and yaw.max() >= 65
    # every check below allows a lone odd face: a bad alignment near 70 degrees (cosine 0.26 here, 0.58 on
    # the CI machine) is a far frame, not a takeover
    calibrated = verify(emb, boxes, yaw, blur, "cosine", SAME)
    assert calibrated.breaks == 0 and calibrated.other.mean() <= 0.05
    strict = 0.45
    far = pairwise("cosine", emb[0], np.stack(emb))[0] > strict
    assert far.any() and yaw[far].min() >= 50  # the turned face is no longer "the frontal face"
    kept = verify(emb, boxes, yaw, blur, "cosine", strict)
    assert kept.breaks == 0 and kept.other.mean() <= 0.05
    assert max(yaw[r] for r in kept.reps) >= 50  # the person is also seen turned
    # the recent faces alone carry a turn past every representative's pose
    recent = verify(emb, boxes, yaw, blur, "cosine", strict, rep_count=1)
    assert recent.reps == [0] and recent.breaks == 0 and recent.other.mean() <= 0.05
    # control: only the frontal reference (no pose-nearest views, no recent faces) calls the turn someone else
    frontal_only = verify(emb, boxes, yaw, blur, "cosine", strict, rep_count=1, yaw_window=180.0)
    assert frontal_only.breaks >= 1 and yaw[frontal_only.other].min() >= 50


def _dissolve(a: list, b: list, frames: int) -> list:
    """Both shots play while `a` fades out and `b` fades in over `frames` frames (no hard cut)."""
    mid = [cv2.addWeighted(x, 1 - (i + 1) / (frames + 1), y, (i + 1) / (frames + 1), 0)
           for i, (x, y) in enumerate(zip(a[-frames:], b[:frames]))]
    return a[:-frames] + mid + b[frames:]


@pytest.fixture(scope="module")
def identity():
    worker = StageWorker(IdentityConsistency({"model_dir": "/nonexistent"}))
    yield worker
    worker.close()


def test_a_cross_dissolve_between_two_real_people_is_a_switch(make_video, carphone, faces, identity):
    man = media.resize(carphone[:105], 320, 240)
    root = devset.ensure()
    other = [f for _, f in sample_frames(str(root / "jwpIntro.mp4"), 1.0, 3.0, 29.97)][:60]
    other = media.resize(other, 320, 240)
    path = make_video("dissolve_carphone_jwp", lambda: _dissolve(man, other, 30), 29.97)
    clips = run_stage(ShotSplit({"min_clip_s": 0.5}), [video_item(path)])
    assert len(clips) == 1, "the shot detector must miss the dissolve for this test to mean anything"
    (item,) = identity.run(faces.run(clips)[0])[0]
    assert item.rejected and item.reject.reason == "identity_switch", item.reject
    assert item.columns["id_track_breaks"] == 1
    t = float(item.reject.detail.split("t=")[1].split("s")[0])
    assert 75 / 29.97 - 0.3 <= t <= 105 / 29.97 + 0.3  # inside the dissolve, not before it
    # control: the same dissolve into the same man (mirrored, later frames) is one person
    same = media.resize(media.mirror(carphone[60:120]), 320, 240)
    path = make_video("dissolve_carphone_self", lambda: _dissolve(man, same, 30), 29.97)
    (kept,) = identity.run(faces.run([clip_item(path)])[0])[0]
    assert not kept.rejected, kept.reject
    assert kept.columns["id_track_breaks"] == 0


def test_a_lone_odd_face_is_no_takeover_but_two_in_a_row_are():
    """One face beyond the bound between faces of the subject is a far frame, not another person."""
    flags = np.zeros(20, bool)
    flags[7] = True
    assert takeovers(flags) == 0
    flags[8] = True  # control: two in a row are a takeover
    assert takeovers(flags) == 1
    flags[15:] = True
    assert takeovers(flags) == 2
