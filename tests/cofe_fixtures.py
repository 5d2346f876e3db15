"""Shard builders for the CoFE tests: real clips, written by the curation pipeline or by hand.

`pose_shards` writes rows over real footage (carphone and its mirror) whose face
columns sweep the head through several EFHQ buckets, which the sample footage
itself (a man facing the camera) never does; `pipeline_shards` runs `lafid.runner`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lafid import media
from lafid.cofe.config import load_cofe_recipe
from lafid.face.pose import pose_bucket
from lafid.schema import CLIP_SCHEMA

FPS = 29.97
BOX = [0.3, 0.25, 0.7, 0.7]


def clip_row(source: str, video: str, index: int, start: float, yaws: list[float], reps: bool) -> dict:
    end = start + 1.5
    t = [i * 0.2 for i in range(len(yaws))]
    buckets = [pose_bucket(y, 0.0) for y in yaws]
    row = {
        "schema_version": 1, "clip_id": f"{video}-{index}", "video_id": video, "source": source,
        "clip_index": index, "start_s": start, "end_s": end, "fps": FPS, "width": 176, "height": 144,
        "frame_t": t, "frame_yaw": yaws, "frame_pitch": [0.0] * len(yaws), "frame_box": [BOX] * len(yaws),
        "pose_bucket": max(set(buckets), key=buckets.count), "pose_buckets": sorted(set(buckets)),
        "caption": f"a man talks on the phone, clip {index}",
    }
    if reps:  # pose-diverse representative ArcFace embeddings, as the identity stage writes them
        rng = np.random.default_rng(index)
        row.update(id_backend="arcface", id_rep_t=t[::2], id_rep_yaw=yaws[::2],
                   id_rep_embeddings=[rng.standard_normal(512).astype(np.float32).tolist() for _ in t[::2]])
    return row


@pytest.fixture(scope="session")
def pose_shards(tmp_path_factory):
    """3 shards, 12 clips over 2 real videos: sweeps through left/frontal/right, and frontal-only clips."""
    root = tmp_path_factory.mktemp("cofe_pose")
    frames = media.carphone_frames()
    sources = {"carphone": media.write_video(str(root / "carphone.mp4"), frames, FPS),
               "mirrored": media.write_video(str(root / "mirrored.mp4"), media.mirror(frames), FPS)}
    sweep = list(np.linspace(-70, 70, 7))
    rows = []
    for k in range(12):
        video = "carphone" if k % 2 == 0 else "mirrored"
        yaws = [0.0, 5.0, -3.0, 2.0, 0.0, 1.0, -2.0] if k % 4 == 3 else (sweep if k % 3 else sweep[::-1])
        rows.append(clip_row(sources[video], video, k, start=0.2 * (k // 2), yaws=[float(y) for y in yaws],
                             reps=k % 3 == 0))
    out = root / "shards"
    out.mkdir()
    for i in range(3):
        pq.write_table(pa.Table.from_pylist(rows[i * 4:(i + 1) * 4], schema=CLIP_SCHEMA), out / f"clips-{i:04d}.parquet")
    return out, rows


@pytest.fixture(scope="session")
def pipeline_shards(tmp_path_factory):
    """Shards written by the real curation pipeline (demo recipe, in-process) from the sample footage."""
    from lafid.recipe import load_recipe
    from lafid.runner import curate

    root = tmp_path_factory.mktemp("cofe_curated")
    inputs = media.make_sample_set(str(root / "input"))
    curate(load_recipe("demo"), inputs, root / "shards", executor="sequential")
    return root / "shards"


def tiny_recipe(shards, output_dir, num_workers: int = 0, **train):
    """The bundled tiny recipe pointed at test shards, with test-sized training settings."""
    r = load_cofe_recipe("cofe_tiny")
    data = {"shards": [str(shards)], "num_workers": num_workers, "bucket_weights": {}}
    return r.model_copy(update={
        "data": r.data.model_copy(update=data),
        "train": r.train.model_copy(update={"output_dir": output_dir, **train}),
    })


# Real people for the identity-only test: (video, start s, seconds); one person each.
PEOPLE = {
    "jwp": ("jwpIntro.mp4", 0.5, 3.0),
    "wolfgang": ("WolfgangLanger_Pexels.mp4", 10.0, 3.0),
    "single_face": ("single_face_pingpong.mp4", 0.5, 3.0),
    "obama": ("extra/obama_speech.mp4", 1.0, 3.0),
    "testmovie": ("extra/testMovie.mp4", 1.0, 3.0),
    "carphone": (None, 0.2, 3.0),
}
SAME_CAPTION = "a person looks at the camera"


def face_rows(people: dict[str, str], caption: str, sample_fps: float = 4.0) -> list[dict]:
    """One shard row per person: the largest SCRFD face (box, 5 landmarks) in frames `sample_fps` apart.

    Yaw is left at 0 (these clips face the camera), so the dataset takes each
    reference face from outside the target window.
    """
    from lafid.face.detect import ScrfdFaces
    from lafid.face.embed import EMBEDDED_SCRFD, embedded_model
    from lafid.video import probe, sample_frames

    scrfd = ScrfdFaces(embedded_model(EMBEDDED_SCRFD), det_size=640)
    rows = []
    for name, (path, start, seconds) in people.items():
        info = probe(path)
        t, boxes, kps = [], [], []
        for ft, frame in sample_frames(path, start, start + seconds, sample_fps):
            faces = scrfd.detect(frame)
            if not faces:
                continue
            h, w = frame.shape[:2]
            scale = np.array([w, h, w, h], np.float64)
            t.append(ft)
            boxes.append((faces[0].box / scale).tolist())
            kps.append((faces[0].kps / np.array([w, h])).reshape(-1).tolist())
        assert len(t) >= 6, f"{name}: a face in only {len(t)} frames"
        rows.append({
            "schema_version": 1, "clip_id": name, "video_id": name, "source": path, "clip_index": 0,
            "start_s": start, "end_s": start + seconds, "fps": info.fps, "width": info.width, "height": info.height,
            "frame_t": t, "frame_yaw": [0.0] * len(t), "frame_pitch": [0.0] * len(t), "frame_box": boxes,
            "frame_kps": kps, "pose_bucket": "frontal", "pose_buckets": ["frontal"], "caption": caption,
        })
    return rows


@pytest.fixture(scope="session")
def identity_shards(tmp_path_factory):
    """Six real people (dev set, carphone), one clip each, every clip with the same caption."""
    from lafid import devset

    try:
        root = devset.ensure()
    except devset.DevSetError as exc:
        pytest.fail(f"dev set unavailable: {exc}")
    return write_identity_shards(root, tmp_path_factory.mktemp("cofe_identity"))


def write_identity_shards(root: Path, out: Path) -> tuple[Path, list[dict]]:
    """The identity-only set under `out`: carphone written there, the others from the dev set at `root`;
    returns (shards folder, rows)."""
    people = {name: str(root / path) if path else media.write_video(str(out / "carphone.mp4"),
                                                                       media.carphone_frames(), FPS)
              for name, (path, _, _) in PEOPLE.items()}
    rows = face_rows({n: (people[n], s, d) for n, (_, s, d) in PEOPLE.items()}, SAME_CAPTION)
    (out / "shards").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=CLIP_SCHEMA), out / "shards" / "clips-0000.parquet")
    return out / "shards", rows


def identity_recipe(shards, output_dir, injection: str = "fused", seed: int = 0, id_references: int = 1, **cofe):
    """The tiny recipe, CoFE only (no LoRA), with the embedded ArcFace (w600k_mbf) as identity expert
    (`id_references` ArcFace vectors per sample)."""
    from lafid.cofe.config import IdentityConfig
    from lafid.face.embed import EMBEDDED_ARCFACE, embedded_model, file_sha256

    r = load_cofe_recipe("cofe_tiny")
    return r.model_copy(update={
        "data": r.data.model_copy(update={"shards": [str(shards)], "num_workers": 0, "bucket_weights": {},
                                          "id_backend": "arcface:w600k_mbf", "seed": seed,
                                          "id_references": id_references,
                                          "id_model_sha256": file_sha256(embedded_model(EMBEDDED_ARCFACE))}),
        "identity": IdentityConfig(backend="onnx", path=embedded_model(EMBEDDED_ARCFACE)),
        "cofe": r.cofe.model_copy(update={"lora_rank": 0, "injection": injection, **cofe}),
        "train": r.train.model_copy(update={"output_dir": output_dir, "seed": seed}),
    })
