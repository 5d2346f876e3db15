"""`lafid bench build`: pick benchmark cases from curated shards, stratified by pose bucket,
identity-disjoint from training.

Identities come from `lafid identities` (identities.parquet in each shard folder). Whole
identities are drawn for the bench, never single clips: every clip of a bench identity is
held out (`split.parquet`) and `lafid train --exclude BENCH` skips it (`lafid.cofe.exclude`).

A clip's bucket: the EFHQ bucket of each sampled frame with a measured face; the clip
belongs to its most frequent non-frontal bucket when that covers at least
`min_bucket_share` of its face frames, else to `frontal`. Buckets are filled rarest
first, one case per identity per bucket, at most `per_bucket` cases each, while bench
identities stay within `max_identity_share` of all identities (at least one identity
always stays for training).

Each case: the target clip (its source and time range), a reference face image cut
square around the head (PNG) from another clip of the same identity (`reference_clip`:
another video first; the target clip itself only when the identity has no other clip,
recorded as `ref_from`), taken at that clip's identity reference frame (near-frontal and
sharp), the target's first frame (whole, PNG: an i2v model's given frame), the prompt
(the clip's caption), pose bucket and yaw range.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lafid.cofe.exclude import SPLIT
from lafid.face.detect import square_crop
from lafid.face.pose import BUCKETS, pose_bucket
from lafid.identity.cluster import OUTPUT as IDENTITIES
from lafid.shards import read_clips, shard_files
from lafid.storage import write_atomic, write_text_atomic
from lafid.video import sample_frames

CASES, INFO, REFS, FIRSTS = "cases.parquet", "bench.json", "refs", "firsts"
REF_MARGIN = 2.0  # reference image side = this x the face box's long side (the whole head)

CLIP_COLUMNS = ["clip_id", "video_id", "source", "start_s", "end_s", "fps", "frame_t", "frame_yaw", "frame_pitch",
                "frame_box", "caption", "id_backend", "id_metric", "id_threshold", "id_ref_embedding", "id_ref_t",
                "id_ref_box"]

CASE_SCHEMA = pa.schema([
    ("case_id", pa.string()), ("clip_id", pa.string()), ("video_id", pa.string()), ("identity_id", pa.string()),
    ("source", pa.string()), ("start_s", pa.float64()), ("end_s", pa.float64()), ("fps", pa.float32()),
    ("pose_bucket", pa.string()), ("bucket_share", pa.float32()), ("yaw_min", pa.float32()),
    ("yaw_max", pa.float32()), ("yaw_range", pa.float32()), ("prompt", pa.string()), ("ref_image", pa.string()),
    ("ref_clip_id", pa.string()), ("ref_from", pa.string()),
    ("ref_t", pa.float32()), ("ref_yaw", pa.float32()), ("ref_pitch", pa.float32()), ("first_image", pa.string()),
])
REF_FROM = ("other video", "other clip", "target clip")  # where a case's reference face comes from, best first
SPLIT_SCHEMA = pa.schema([
    ("clip_id", pa.string()), ("video_id", pa.string()), ("identity_id", pa.string()), ("split", pa.string()),
    ("id_backend", pa.string()), ("id_threshold", pa.float32()), ("id_ref_embedding", pa.list_(pa.float32())),
])


class BenchError(ValueError):
    """The shards cannot make a bench (no identities yet, too few identities, ...)."""


def _floats(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values or []], np.float64)


def clip_bucket(yaw, pitch, min_share: float = 0.25) -> tuple[str, float, int]:
    """(bucket, share of face frames in it, face frames) of one clip; see the module docstring."""
    yaw, pitch = _floats(yaw), np.nan_to_num(_floats(pitch))
    faces = [pose_bucket(y, p) for y, p in zip(yaw, pitch) if not np.isnan(y)]
    if not faces:
        return "none", 0.0, 0
    counts = Counter(faces)
    hard = max((b for b in counts if b != "frontal"), key=lambda b: (counts[b], -BUCKETS.index(b)), default=None)
    if hard is not None and counts[hard] / len(faces) >= min_share:
        return hard, counts[hard] / len(faces), len(faces)
    return "frontal", counts["frontal"] / len(faces), len(faces)


def load_clips(shards: list[Path]) -> list[dict]:
    """Clip rows of every shard folder with their `identity_id`; refuses folders without identities."""
    rows: list[dict] = []
    for folder in shards:
        folder = Path(folder)
        files = shard_files(folder)
        if not files:
            raise BenchError(f"{folder}: no clips-*.parquet shards (make them with `lafid curate VIDEOS --out {folder}`)")
        names = set(pq.read_schema(files[0]).names)
        clips = read_clips(folder, [c for c in CLIP_COLUMNS if c in names]).to_pylist()
        ident_path = folder / IDENTITIES
        if not ident_path.exists():
            raise BenchError(f"{folder}: no {IDENTITIES}; bench cases are split by identity, so run "
                             f"`lafid identities {folder}` first")
        identity = {r["clip_id"]: r["identity_id"] for r in pq.read_table(ident_path).to_pylist()}
        stale = [c["clip_id"] for c in clips if c.get("id_ref_embedding") and c["clip_id"] not in identity]
        if stale:
            raise BenchError(f"{folder}: {IDENTITIES} misses {len(stale)} clips written after it (e.g. {stale[0]}); "
                             f"rerun `lafid identities {folder}`")
        for c in clips:
            c["identity_id"] = identity.get(c["clip_id"])
            c["shards"] = str(folder)
        rows += clips
    return rows


def select(clips: list[dict], per_bucket: int, seed: int, max_identity_share: float,
           min_bucket_share: float = 0.25) -> tuple[list[dict], set[str]]:
    """(cases as clip rows with `pose_bucket` / `bucket_share` set, bench identities): see module docstring."""
    usable = []
    for c in clips:
        if c.get("identity_id") is None:
            continue
        bucket, share, n = clip_bucket(c.get("frame_yaw"), c.get("frame_pitch"), min_bucket_share)
        if n:
            usable.append({**c, "pose_bucket": bucket, "bucket_share": share})
    people = sorted({c["identity_id"] for c in usable})
    if len(people) < 2:
        raise BenchError(f"{len(people)} identities with measured faces: a bench needs at least 2 "
                         "(one for the bench, one left for training)")
    limit = min(len(people) - 1, max(1, int(np.floor(max_identity_share * len(people)))))
    rng = np.random.default_rng(seed)
    order = [people[i] for i in rng.permutation(len(people))]
    by_person: dict[str, list[dict]] = {p: [] for p in people}
    for c in sorted(usable, key=lambda c: c["clip_id"]):
        by_person[c["identity_id"]].append(c)
    holders = {b: [p for p in order if any(c["pose_bucket"] == b for c in by_person[p])] for b in BUCKETS}
    bench: list[str] = []
    cases: dict[str, list[dict]] = {b: [] for b in BUCKETS}

    def take(person: str) -> None:
        for b in BUCKETS:
            mine = [c for c in by_person[person] if c["pose_bucket"] == b]
            if mine and len(cases[b]) < per_bucket:
                cases[b].append(mine[rng.integers(len(mine))])

    for b in sorted(BUCKETS, key=lambda b: (len(holders[b]), BUCKETS.index(b))):  # rarest bucket first
        for person in holders[b]:
            if len(cases[b]) >= per_bucket or len(bench) >= limit:
                break
            if person not in bench:
                bench.append(person)
                take(person)
    return [c for b in BUCKETS for c in cases[b]], set(bench)


def reference_frame(c: dict) -> tuple[float, np.ndarray]:
    """(time from clip start, normalised box) of the case's reference face: the identity stage's
    reference when it has one, else the most frontal measured frame."""
    t = _floats(c.get("frame_t"))
    if c.get("id_ref_t") is not None and c.get("id_ref_box"):
        return float(c["id_ref_t"]), np.asarray(c["id_ref_box"], np.float64)
    yaw, pitch = _floats(c.get("frame_yaw")), np.nan_to_num(_floats(c.get("frame_pitch")))
    boxes = c.get("frame_box") or []
    ok = [i for i in range(len(t)) if not np.isnan(yaw[i]) and boxes[i] is not None]
    i = min(ok, key=lambda i: abs(yaw[i]) + abs(pitch[i]))
    return float(t[i]), np.asarray(boxes[i], np.float64)


def frame_at(source: str, t: float, fps: float) -> np.ndarray:
    """The displayed RGB frame at `t` seconds on the source's timeline."""
    for _, frame in sample_frames(source, t, t + 2.0 / max(fps, 1.0), max(fps, 1.0)):
        return frame
    raise BenchError(f"{source}: no frame at {t:.3f}s")


def reference_clip(case: dict, clips: list[dict]) -> tuple[dict, str]:
    """(clip the reference face is cut from, `REF_FROM` label): another clip of the case's identity, from
    another video when there is one, so the reference is not a frame of the target; the target clip itself
    only when its identity has no other clip with a measured face."""
    others = [c for c in clips if c.get("identity_id") == case["identity_id"] and c["clip_id"] != case["clip_id"]
              and any(y is not None for y in c.get("frame_yaw") or [])]
    for label, pool in (("other video", [c for c in others if c["video_id"] != case["video_id"]]),
                        ("other clip", others)):
        if pool:
            return min(pool, key=lambda c: c["clip_id"]), label
    return case, "target clip"


def save_first_frame(c: dict, path: Path) -> None:
    """The target clip's first frame, whole (an i2v model's given frame, as training gives the first frame of
    its window: `lafid.cofe.data.fit` makes both the video size)."""
    frame = frame_at(c["source"], c["start_s"], c["fps"] or 25.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)):
        raise BenchError(f"could not write {path}")


def save_reference(c: dict, path: Path, size: int) -> dict:
    t, box = reference_frame(c)
    frame = frame_at(c["source"], c["start_s"] + t, c["fps"] or 25.0)
    h, w = frame.shape[:2]
    crop = square_crop(frame, box * np.array([w, h, w, h]), size, REF_MARGIN, cv2.BORDER_REPLICATE, antialias=True)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR)):
        raise BenchError(f"could not write {path}")
    ft = _floats(c.get("frame_t"))
    i = int(np.argmin(np.abs(ft - t))) if len(ft) else None
    yaw, pitch = _floats(c.get("frame_yaw")), _floats(c.get("frame_pitch"))
    return {"ref_t": t, "ref_yaw": None if i is None or np.isnan(yaw[i]) else float(yaw[i]),
            "ref_pitch": None if i is None or np.isnan(pitch[i]) else float(pitch[i])}


def build(shards: list[str | Path], out: str | Path, per_bucket: int = 20, seed: int = 0,
          max_identity_share: float = 0.2, min_bucket_share: float = 0.25, ref_size: int = 256) -> dict:
    """Write BENCH/{cases.parquet, split.parquet, bench.json, refs/*.png}; returns bench.json's content."""
    out = Path(out)
    clips = load_clips([Path(s) for s in shards])
    chosen, bench_ids = select(clips, per_bucket, seed, max_identity_share, min_bucket_share)
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for c in chosen:
        case_id = f"case-{c['clip_id']}"
        rel, first = f"{REFS}/{case_id}.png", f"{FIRSTS}/{case_id}.png"
        ref_clip, ref_from = reference_clip(c, clips)
        ref = save_reference(ref_clip, out / rel, ref_size)
        save_first_frame(c, out / first)
        yaw = _floats(c.get("frame_yaw"))
        yaw = yaw[~np.isnan(yaw)]
        cases.append({"case_id": case_id, "clip_id": c["clip_id"], "video_id": c["video_id"],
                      "identity_id": c["identity_id"], "source": c["source"], "start_s": c["start_s"],
                      "end_s": c["end_s"], "fps": c["fps"], "pose_bucket": c["pose_bucket"],
                      "bucket_share": c["bucket_share"], "yaw_min": float(yaw.min()), "yaw_max": float(yaw.max()),
                      "yaw_range": float(yaw.max() - yaw.min()), "prompt": c.get("caption") or "",
                      "ref_image": rel, "ref_clip_id": ref_clip["clip_id"], "ref_from": ref_from,
                      "first_image": first, **ref})
    split = [{"clip_id": c["clip_id"], "video_id": c["video_id"], "identity_id": c["identity_id"],
              "split": "bench" if c["identity_id"] in bench_ids else "train", "id_backend": c.get("id_backend"),
              "id_threshold": c.get("id_threshold"), "id_ref_embedding": c.get("id_ref_embedding")}
             for c in clips if c.get("identity_id") is not None]
    write_atomic(pa.Table.from_pylist(cases, schema=CASE_SCHEMA), out / CASES)
    write_atomic(pa.Table.from_pylist(split, schema=SPLIT_SCHEMA), out / SPLIT)
    info = {"shards": [str(Path(s).resolve()) for s in shards], "per_bucket": per_bucket, "seed": seed,
            "max_identity_share": max_identity_share, "min_bucket_share": min_bucket_share, "ref_size": ref_size,
            "cases": len(cases), "cases_per_bucket": {b: sum(c["pose_bucket"] == b for c in cases) for b in BUCKETS},
            "identities": len({s["identity_id"] for s in split}), "bench_identities": len(bench_ids),
            "bench_clips": sum(s["split"] == "bench" for s in split), "cases_without_prompt":
            sum(not c["prompt"] for c in cases), "reference_from": {k: sum(c["ref_from"] == k for c in cases)
                                                                    for k in REF_FROM}}
    write_text_atomic(json.dumps(info, indent=2) + "\n", out / INFO)
    return info


def load_cases(bench: str | Path) -> list[dict]:
    path = Path(bench) / CASES
    if not path.exists():
        raise FileNotFoundError(f"{bench}: no {CASES}; make it with `lafid bench build SHARDS --out {bench}`")
    return pq.read_table(path).to_pylist()
