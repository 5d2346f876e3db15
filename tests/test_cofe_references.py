"""CoFE identity inputs: several reference faces across poses (`data.id_references`), and shard
embeddings used only from the trainer's own ArcFace file (`id_model_sha256`)."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lafid.cofe.config import CoFERecipe, DataConfig, IdentityConfig, load_cofe_recipe
from lafid.cofe.data import ClipDataset, collate, frame_poses, plan_clip, reference_set
from lafid.cofe.experts import IdentityExpert
from lafid.cofe.fusion import TokenProjection, VectorProjection
from lafid.cofe.model import CoFEModel
from lafid.face.embed import EMBEDDED_ARCFACE, embedded_model
from lafid.schema import CLIP_SCHEMA
from cofe_fixtures import pose_shards, tiny_recipe  # noqa: F401  (fixture)


def config(shards, **kw) -> DataConfig:
    return DataConfig(shards=[str(shards)], num_frames=5, frame_stride=2, height=32, width=32, face_size=56, **kw)


def test_several_reference_faces_across_poses(pose_shards):  # noqa: F811
    shards, rows = pose_shards
    by_id = {r["clip_id"]: r for r in rows}
    one = list(ClipDataset(config(shards)))
    three = list(ClipDataset(config(shards, id_references=3)))
    assert [s["clip_id"] for s in one] == [s["clip_id"] for s in three]
    for a, b in zip(one, three):
        row = by_id[a["clip_id"]]
        assert a["id_face"].shape == (112, 112, 3) and "id_mask" not in a  # the single-vector path as before
        assert b["id_face"].shape == (3, 112, 112, 3) and b["id_mask"].tolist() == [True] * 3
        assert torch.equal(b["id_face"][0], a["id_face"])  # the pose-aware reference comes first
        assert not torch.equal(b["id_face"][1], b["id_face"][0])
        if row.get("id_rep_embeddings"):  # representatives carry their precomputed embedding each
            assert b["id_has"].all() and b["id_embedding"].shape == (3, 512)
            for e in b["id_embedding"]:
                assert sum(np.allclose(e.numpy(), r) for r in row["id_rep_embeddings"]) == 1
            assert torch.equal(b["id_embedding"][0], a["id_embedding"])
        else:
            assert not b["id_has"].any() and b["id_embedding"].shape == (3, 0)
    # across poses: a clip sweeping left -> frontal -> right gets three different pose buckets
    sweep = next(r for r in rows if len(r["pose_buckets"]) >= 3 and not r.get("id_rep_embeddings"))
    cfg = config(shards, id_references=3)
    start, ref, targets, _ = plan_clip(sweep, cfg, np.random.default_rng(0))
    refs = reference_set(sweep, cfg, start, ref, targets)
    assert refs[0] == ref and len({p.bucket for p in refs}) == 3, [p.bucket for p in refs]
    # control: one reference is one face
    assert reference_set(sweep, config(shards), start, ref, targets) == [ref]

    batch = collate(three[:4])
    assert batch["id_face"].shape == (4, 3, 112, 112, 3) and batch["id_mask"].shape == batch["has_id"].shape == (4, 3)
    with_reps = [i for i, s in enumerate(three[:4]) if s["id_has"].any()]
    assert batch["has_id"].sum() == 3 * len(with_reps) and batch["id_embedding"].shape == (4, 3, 512)
    other_backend = list(ClipDataset(config(shards, id_backend="dlib", id_references=3)))
    assert not any(s["id_has"].any() for s in other_backend)  # control: another backend's vectors are not used


def test_a_clip_with_fewer_faces_is_padded_and_masked(pose_shards):  # noqa: F811
    shards, rows = pose_shards
    row = dict(next(r for r in rows if not r.get("id_rep_embeddings")))
    row["frame_yaw"] = [v if i in (0, 6) else None for i, v in enumerate(row["frame_yaw"])]  # two measured faces
    assert len(frame_poses(row)) == 2
    ds = ClipDataset(config(shards, id_references=4))
    s = ds.sample(row, np.random.default_rng(0))
    assert s["id_mask"].tolist() == [True, True, False, False]
    assert s["id_face"][2:].eq(0).all() and s["id_face"][:2].float().std() > 10


def tiny_identity(**kw) -> IdentityExpert:
    torch.manual_seed(0)
    return IdentityExpert(IdentityConfig(layers=[1, 1, 1, 1], width=8, dim=32, **kw))


def test_identity_expert_gives_one_token_per_face_and_zero_for_padding():
    expert = tiny_identity()
    faces = torch.randint(0, 256, (2, 3, 112, 112, 3), dtype=torch.uint8)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    pre = torch.randn(2, 3, 32)
    has = torch.tensor([[False, True, False], [False, False, True]])  # a padded face's vector is never used
    out = expert(faces, pre, has, mask)
    assert out.shape == (2, 3, 32)
    assert out[~mask].eq(0).all() and torch.allclose(out[mask].norm(dim=-1), torch.ones(3))
    assert torch.allclose(out[0, 0], expert.encode(faces[0, :1])[0], atol=1e-5)
    assert torch.allclose(out[1, 0], expert.encode(faces[1, :1])[0], atol=1e-5)
    assert torch.allclose(out[0, 1], torch.nn.functional.normalize(pre[0, 1], dim=-1))
    single = expert(faces[:, 0])  # the single-vector path: one token
    assert single.shape == (2, 1, 32) and torch.allclose(single[:, 0], out[:, 0], atol=1e-5)


def test_projections_ignore_padded_references():
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(2, 2, 32), dim=-1)
    padded = torch.cat([v, torch.zeros(2, 1, 32)], 1)
    noise = torch.cat([v, torch.randn(2, 1, 32)], 1)
    resample, expand = TokenProjection(32, 16, 4, 2).eval(), VectorProjection(32, 16, 4).eval()
    assert torch.allclose(resample(padded), resample(v), atol=1e-6)
    assert not torch.allclose(resample(noise), resample(v), atol=1e-3)  # control: a present third face counts
    assert torch.allclose(expand(padded), expand(v), atol=1e-6)
    assert torch.allclose(expand(v), expand(v.mean(1, keepdim=True)), atol=1e-6)  # the mean of the faces
    assert not torch.allclose(expand(padded), expand(padded.mean(1, keepdim=True)), atol=1e-3)  # padding not averaged
    tokens = resample(v)
    assert tokens.shape == (2, 4, 16) and (tokens[:, 0] - tokens[:, 1]).abs().max() > 1e-3


def test_tiny_model_trains_on_several_references(pose_shards, tmp_path):  # noqa: F811
    shards, _ = pose_shards
    r = tiny_recipe(shards, tmp_path)
    recipe = r.model_copy(update={"data": r.data.model_copy(update={"id_references": 3, "id_backend": "dlib"}),
                                  "cofe": r.cofe.model_copy(update={"lora_rank": 0})})
    torch.manual_seed(0)
    model = CoFEModel(recipe)
    batch = collate(list(ClipDataset(recipe.data))[:2])
    feats = model.face_features(batch)
    assert feats["id"].shape == (2, 3, 512)
    project = model.adapter.projections["id"]
    with torch.no_grad():  # the other faces reach the identity tokens (resample: 3 keys)
        assert not torch.allclose(project(feats["id"]), project(feats["id"][:, :1]), atol=1e-4)
    assert torch.isfinite(model(batch, torch.Generator().manual_seed(0)))


# --- shard embeddings only from the trainer's ArcFace file ---

def test_recipe_takes_the_onnx_files_sha256():
    path = embedded_model(EMBEDDED_ARCFACE)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    raw = load_cofe_recipe("cofe_tiny").model_dump(mode="json")
    raw["identity"] = {"backend": "onnx", "path": str(path)}
    assert CoFERecipe.model_validate(raw).data.id_model_sha256 == sha
    raw["data"]["id_model_sha256"] = sha
    assert CoFERecipe.model_validate(raw).data.id_model_sha256 == sha
    raw["data"]["id_model_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="is not the sha256 of identity.path"):
        CoFERecipe.model_validate(raw)
    assert load_cofe_recipe("cofe_tiny").data.id_model_sha256 is None  # iresnet: names compared only


def test_an_onnx_folder_is_hashed_as_the_model_file_the_expert_loads(tmp_path):
    """identity.path may be a folder (the expert looks for a known pack in it, else the embedded
    model): the hash is that file's, the one the expert reports, not an attempt to read the folder."""
    from lafid.cofe.experts import IdentityExpert

    raw = load_cofe_recipe("cofe_tiny").model_dump(mode="json")
    raw["identity"] = {"backend": "onnx", "path": str(tmp_path)}  # no pack inside: the embedded model
    recipe = CoFERecipe.model_validate(raw)
    expert = IdentityExpert(recipe.identity)
    assert recipe.data.id_model_sha256 == expert.sha256
    assert expert.sha256 == hashlib.sha256(embedded_model(EMBEDDED_ARCFACE).read_bytes()).hexdigest()


def test_shard_embeddings_of_another_model_file_are_not_used(pose_shards, tmp_path):  # noqa: F811
    _, rows = pose_shards
    ours, theirs = "a" * 64, "b" * 64
    picked = [dict(r, id_backend="arcface:w600k_mbf") for r in rows if r.get("id_rep_embeddings")][:3]
    for r, sha in zip(picked, (ours, theirs, None)):
        r["id_model_sha256"] = sha
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(picked, schema=CLIP_SCHEMA), tmp_path / "shards" / "clips-0000.parquet")

    def used(**kw) -> dict[str, bool]:
        ds = ClipDataset(config(tmp_path / "shards", id_backend="arcface:w600k_mbf", **kw))
        return {s["clip_id"]: s["id_embedding"].numel() > 0 for s in ds}

    ids = [r["clip_id"] for r in picked]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = used(id_model_sha256=ours)
    assert got == {ids[0]: True, ids[1]: False, ids[2]: False}
    lines = {str(w.message) for w in caught if "sha256" in str(w.message)}
    assert any(ours in m and theirs in m for m in lines) and any("not recorded" in m for m in lines)
    assert all("\n" not in m for m in lines)
    assert used(id_model_sha256=theirs) == {ids[0]: False, ids[1]: True, ids[2]: False}
    assert used() == dict.fromkeys(ids, True)  # control: no hash known, the names alone match


def test_cache_keeps_one_identity_token_per_reference_face(pose_shards, tmp_path):  # noqa: F811
    from lafid.cofe.cache import ClipCache, cache_rng, check_meta
    from lafid.cofe.precompute import build_cache
    from lafid.cofe.train import Trainer

    shards, rows = pose_shards
    r = tiny_recipe(shards, tmp_path / "out")
    plain = r.model_copy(update={"data": r.data.model_copy(update={"id_references": 3})})
    cached = plain.model_copy(update={"data": plain.data.model_copy(update={"cache": tmp_path / "cache"})})
    assert build_cache(cached, shard_size=6).clips == len(rows)
    ds, cache, trainer = ClipDataset(plain.data), ClipCache(tmp_path / "cache"), Trainer(plain)
    row = ds._row(0, 0)
    uncached = collate([ds.sample(row, cache_rng(plain.data.seed, row["clip_id"]))])
    hit = cache.sample(row["clip_id"])
    with torch.no_grad():
        want = trainer.core.face_features(uncached)["id"][0]
    assert hit["feat.id"].shape == want.shape == (3, 512)
    torch.testing.assert_close(hit["feat.id"], want, rtol=1e-5, atol=1e-6)
    check_meta(tmp_path / "cache", cached)
    with pytest.raises(ValueError, match="differs in data"):  # control: a one-face recipe does not take this cache
        check_meta(tmp_path / "cache", r)


def test_model_refuses_a_hash_that_is_not_its_onnx_file():
    path = embedded_model(EMBEDDED_ARCFACE)
    r = load_cofe_recipe("cofe_tiny")
    onnx = r.model_copy(update={"identity": IdentityConfig(backend="onnx", path=path),
                                "data": r.data.model_copy(update={"id_backend": "arcface:w600k_mbf",
                                                                  "id_model_sha256": "0" * 64})})
    with pytest.raises(ValueError, match="is not the identity expert's model file"):
        CoFEModel(onnx)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    same = onnx.model_copy(update={"data": onnx.data.model_copy(update={"id_model_sha256": sha})})
    assert CoFEModel(same).experts.identity.sha256 == sha  # control: its own file's hash builds
