"""Every column lafid writes, in one place.

Stages fill `Item.columns` with names from this module; the writer turns items
into rows here (`clip_row`, `reject_row`) and rows into tables with
`pa.Table.from_pylist(rows, schema=...)`. Bump `SCHEMA_VERSION` when a column
changes meaning or type; adding a nullable column is backward compatible.
Version 1 shards read as version 2 (`lafid.shards.read_clips` reads every shard with
the current schema): they lack `source_bytes`, which is null there as it is for
every path that is valid UTF-8, and their reject rows lack the clip columns (`MEASURED`)
that version 2 reject rows carry, read as null as for a clip no stage measured.

Paths are bytes on POSIX and need not be UTF-8, but Parquet strings must be.
`source` is the path for display (exact whenever the path is UTF-8; otherwise each
undecodable byte shows as U+FFFD), and `source_bytes` holds the exact bytes when
`source` does not; `source_path(row)` gives back the path to open.

Per-frame arrays hold one value per *sampled* frame (`frame_t`); NaN marks a
frame where no face was measured.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import pyarrow as pa

from lafid.item import Item

SCHEMA_VERSION = 2

_f32 = pa.float32()
_f32s = pa.list_(pa.float32())
_box = pa.list_(pa.float32())  # x0, y0, x1, y1
_kps = pa.list_(pa.float32())  # x0, y0, ..., x4, y4
_word = pa.struct([("word", pa.string()), ("start", _f32), ("end", _f32), ("prob", _f32)])


def _field(name: str, type_: pa.DataType, doc: str) -> pa.Field:
    return pa.field(name, type_, metadata={"doc": doc})


_SOURCE_DOC = ("absolute source path (symlinks kept as listed) or URI, as text: exact when the path is UTF-8, "
               "else each undecodable byte is U+FFFD (see source_bytes)")
_SOURCE_BYTES_DOC = ("the path's exact bytes when `source` is not exact (a file name that is not UTF-8); "
                     "null otherwise. lafid.schema.source_path(row) gives the path to open")


# Columns every clip row has, set by the writer and the shot-split stage.
CORE = [
    _field("schema_version", pa.int16(), "version of this schema"),
    _field("clip_id", pa.string(), "hash of video_id and the clip's time range"),
    _field("video_id", pa.string(), "hash of the source file's content"),
    _field("source", pa.string(), _SOURCE_DOC),
    _field("source_bytes", pa.binary(), _SOURCE_BYTES_DOC),
    _field("clip_index", pa.int32(), "index of the clip within its video"),
    _field("start_s", pa.float64(), "clip start, seconds on the source's timeline (from frame timestamps)"),
    _field("end_s", pa.float64(), "clip end in the source, seconds (exclusive)"),
    _field("start_frame", pa.int64(), "first source frame of the clip"),
    _field("end_frame", pa.int64(), "source frame after the clip's last frame"),
    _field("fps", _f32, "source average frame rate (times come from frame timestamps)"),
    _field("width", pa.int32(), "source width in pixels as displayed (after its display rotation)"),
    _field("height", pa.int32(), "source height in pixels as displayed (after its display rotation)"),
    _field("has_audio", pa.bool_(), "the source has an audio stream"),
]

# Face Constraints stage.
FACE = [
    _field("sample_fps", _f32, "analysis frame rate"),
    _field("frame_t", _f32s, "time of each sampled frame, seconds from clip start"),
    _field("frame_face_count", pa.list_(pa.int8()), "faces detected in each sampled frame"),
    _field("frame_box", pa.list_(_box), "tracked face box x0,y0,x1,y1, normalised to [0,1]"),
    _field("frame_kps", pa.list_(_kps),
           "tracked face's 5 landmarks x0,y0,...,x4,y4 in ArcFace order (eye centres, nose tip, mouth corners, "
           "image-left first), normalised to [0,1] by frame width/height; from the mesh, or SCRFD's own with "
           "detector=scrfd (null: none)"),
    _field("frame_score", _f32s, "detection score of the tracked face"),
    _field("frame_yaw", _f32s, "head yaw in degrees; positive = face turned to the image's right"),
    _field("frame_yaw_beyond", pa.list_(pa.bool_()),
           "yaw past what the estimator measures (scrfd: |yaw| > 75); frame_yaw then holds that bound, signed"),
    _field("frame_pitch", _f32s, "head pitch in degrees; positive = looking up"),
    _field("frame_roll", _f32s, "head roll in degrees; positive = head tilted clockwise in the image"),
    _field("frame_blur", _f32s, "Laplacian variance of the face crop (higher = sharper)"),
    _field("frame_area", _f32s, "face box area over frame area"),
    _field("frame_mouth_open", _f32s, "inner-lip gap over face height (mesh points 13/14 over 10/152)"),
    _field("face_ratio", _f32, "share of sampled frames with a tracked face"),
    _field("single_face_ratio", _f32, "share of sampled frames with exactly one face"),
    _field("face_area_median", _f32, "median face area ratio"),
    _field("blur_median", _f32, "median Laplacian variance of the face"),
    _field("yaw_min", _f32, "minimum yaw, degrees"),
    _field("yaw_max", _f32, "maximum yaw, degrees"),
    _field("yaw_range", _f32, "yaw_max - yaw_min"),
    _field("abs_yaw_max", _f32, "largest |yaw|"),
    _field("pitch_range", _f32, "pitch max - min"),
    _field("roll_range", _f32, "roll max - min"),
    _field("large_pose_ratio", _f32, "share of face frames with |yaw| >= the recipe's large-pose threshold"),
    _field("pose_bucket", pa.string(), "most common EFHQ pose bucket: frontal/left/right/up/down/extreme"),
    _field("pose_buckets", pa.list_(pa.string()), "distinct pose buckets seen in the clip"),
]

# Identity Consistency stage. Distances are in the backend's metric (`id_metric`):
# L2 for dlib, cosine distance 1 - cos for ArcFace; lower = more alike, and
# `id_threshold` is the same-person bound the clip was judged with.
IDENTITY = [
    _field("id_backend", pa.string(), "identity encoder: dlib, or arcface:<model> (e.g. arcface:w600k_mbf); "
           "embeddings compare only within one backend"),
    _field("id_model_sha256", pa.string(), "sha256 of the identity model file (the ArcFace .onnx) the embeddings "
           "come from; null for dlib"),
    _field("id_metric", pa.string(), "distance used: l2 (dlib) or cosine = 1 - cos (arcface)"),
    _field("id_threshold", _f32, "same-person distance bound used for this clip"),
    _field("id_ref_embedding", _f32s, "embedding of the reference face (most frontal, sharpest)"),
    _field("id_ref_t", _f32, "time of the reference face, seconds from clip start"),
    _field("id_ref_box", _box, "reference face box, normalised"),
    _field("id_ref_face", pa.binary(), "reference face aligned as the backend sees it, PNG bytes"),
    _field("id_rep_embeddings", pa.list_(_f32s), "pose-diverse representative embeddings, reference first"),
    _field("id_rep_yaw", _f32s, "yaw of each representative embedding"),
    _field("id_rep_t", _f32s, "time of each representative embedding"),
    _field("id_frame_dist", _f32s, "per frame: the subject's distance to the reference (NaN: no face or not embedded)"),
    _field("id_frame_box", pa.list_(_box),
           "per frame: the subject's box (= frame_box) where identity verified it is the clip's person "
           "(null: no face, not embedded, or someone else)"),
    _field("id_dist_ref_max", _f32, "largest frame-to-reference distance on the track"),
    _field("id_dist_ref_median", _f32, "median frame-to-reference distance on the track"),
    _field("id_dist_centroid_max", _f32, "largest frame-to-centroid distance on the track"),
    _field("id_far_ratio", _f32, "share of face frames beyond id_threshold from the subject at their pose "
           "(pose-nearest representatives, or recent faces at a pose none covers), takeovers included"),
    _field("id_dist_frontal_median", _f32, "median distance to the reference on frontal frames (|yaw| < large)"),
    _field("id_dist_large_pose_median", _f32, "median distance to the reference on large-yaw frames"),
    _field("id_track_breaks", pa.int32(), "times another person took over the identity track"),
    _field("id_other_frames", pa.int32(), "face frames where another person holds the subject track"),
    _field("id_same_frames", pa.int32(), "face frames verified as the clip's subject"),
    _field("id_switch_t", _f32, "time of the first frame another person holds the track, seconds from clip start "
           "(null: never)"),
    _field("id_switch_dist", _f32, "that face's distance from the subject at its pose"),
    _field("id_track_dist_max", _f32, "largest distance of a face frame from the subject at its pose (what "
           "id_far_ratio counts against id_threshold)"),
]

# Speech Disambiguation stage.
SPEECH = [
    _field("speech_segments", pa.list_(_f32s), "VAD speech segments [start, end], seconds from clip start"),
    _field("speech_ratio", _f32, "share of the clip covered by speech"),
    _field("transcript", pa.string(), "ASR transcript of the speech segments"),
    _field("words", pa.list_(_word), "ASR words with times relative to the clip"),
    _field("language", pa.string(), "detected language code"),
    _field("asr_confidence", _f32, "mean word probability"),
    _field("lip_activity", _f32, "mean absolute change of mouth opening per second"),
    _field("av_sync", _f32, "lip/voice sync score: z-score of the best agreement within max_lag_s against "
           "far lags (in step at >= min_sync_score); null when not measured"),
    _field("av_lag_s", _f32, "lag of the best near agreement, seconds (positive = audio later)"),
    _field("av_peak_z", _f32, "z-score of the lag curve's highest point against the rest of the curve (one "
           "clear offset); null when not measured or when that point is at the end of the lags searched"),
    _field("av_peak_lag_s", _f32, "lag of that highest point, seconds (out of step when far from 0)"),
    _field("visual_speaking", _f32, "speaking probability of the lips in speech (lip_detector vvad), else null"),
    _field("speaking_label", pa.string(),
           "speaking / voice_over (each only with positive evidence) / uncertain (speech, no clear evidence "
           "either way) / silent / mouthing / no_audio"),
    _field("caption", pa.string(), "caption that agrees with the speaking label"),
    _field("caption_source", pa.string(),
           "who wrote the caption: source, template or vlm; '+disambiguated' when speech claims were rewritten"),
]

# Clip Quality stage (optional). Motion is Farneback optical flow on small grey frames,
# in pixels per second relative to the frame's longer side (so resolution does not change it).
QUALITY = [
    _field("motion", _f32, "mean optical-flow magnitude between neighbouring frames, in frame lengths (longer side) "
           "per second (0 = still)"),
    _field("motion_camera", _f32, "median flow magnitude over the frame: the global (camera) part of motion"),
    _field("motion_subject", _f32, "mean flow magnitude left after removing the median flow (subject motion)"),
    _field("text_area", _f32, "share of the frame covered by text lines found in at least half the sampled "
           "frames (burned-in captions, watermarks)"),
    _field("text_frames", _f32, "share of sampled frames with any detected text line"),
    _field("aesthetic", _f32, "aesthetic score from the model directory given to the stage; null when none"),
]

# `lafid export`: where the clip's own MP4 lies (its first frame is the frame at start_s).
EXPORT = [
    _field("clip_file", pa.string(), "exported clip file, relative to the export folder (null in curate output)"),
]

CLIP_SCHEMA = pa.schema(CORE + FACE + IDENTITY + SPEECH + QUALITY + EXPORT, metadata={"lafid_schema_version": str(SCHEMA_VERSION)})

_REJECT_FIELDS = [
    _field("schema_version", pa.int16(), "version of this schema"),
    _field("video_id", pa.string(), "hash of the source file's content (or path if unreadable)"),
    _field("clip_id", pa.string(), "clip id, null when the whole video was rejected"),
    _field("source", pa.string(), _SOURCE_DOC),
    _field("source_bytes", pa.binary(), _SOURCE_BYTES_DOC),
    _field("clip_index", pa.int32(), "clip index, -1 for a whole video"),
    _field("start_s", pa.float64(), "clip start, seconds"),
    _field("end_s", pa.float64(), "clip end, seconds"),
    _field("stage", pa.string(), "stage that rejected the item"),
    _field("reason", pa.string(), "stable reason code"),
    _field("detail", pa.string(), "human-readable detail"),
]
# A rejected clip keeps every measurement made before it was rejected (schema 2): the clip columns of the
# stages it passed and of the stage that rejected it; null for stages it never reached.
MEASURED = [f for f in CLIP_SCHEMA if f.name not in {r.name for r in _REJECT_FIELDS}]
REJECT_SCHEMA = pa.schema(_REJECT_FIELDS + MEASURED, metadata={"lafid_schema_version": str(SCHEMA_VERSION)})

IDENTITY_SCHEMA = pa.schema(
    [
        _field("clip_id", pa.string(), "clip id"),
        _field("video_id", pa.string(), "source video id"),
        _field("identity_id", pa.string(), "cross-clip identity cluster"),
        _field("identity_size", pa.int32(), "clips in the cluster"),
    ]
)

CLIP_COLUMNS = frozenset(CLIP_SCHEMA.names)
MEASURED_COLUMNS = frozenset(f.name for f in MEASURED)
# Clip columns the writer fills from the item itself (no stage writes them).
ITEM_COLUMNS = ("schema_version", "clip_id", "video_id", "source", "source_bytes", "clip_index", "start_s", "end_s")


_FLOAT32 = {f.name: depth for f in CLIP_SCHEMA for depth, t in enumerate((_f32, _f32s, pa.list_(_f32s)))
            if f.type == t}  # float32 columns and how deep their lists nest


def stored(columns: dict[str, Any]) -> dict[str, Any]:
    """The float32 columns (scalars, lists, lists of lists) of `columns` as a shard gives them back, so a
    decision made on a fresh measurement is the one `lafid filter` makes on the stored row."""
    return {k: _as_float32(v, _FLOAT32[k]) for k, v in columns.items() if k in _FLOAT32}


def _as_float32(value: Any, depth: int) -> Any:
    if value is None:
        return None
    return float(np.float32(value)) if depth == 0 else [_as_float32(v, depth - 1) for v in value]


def names(fields: list[pa.Field]) -> tuple[str, ...]:
    """Column names of a group of fields (for a stage's `reads` / `writes`)."""
    return tuple(f.name for f in fields)


def source_columns(path: str) -> dict[str, Any]:
    """`source` and `source_bytes` of a path as Python names it (os.fsdecode: undecodable bytes are
    lone surrogates, which no UTF-8 writer accepts)."""
    if display(path) == path:
        return {"source": path, "source_bytes": None}
    return {"source": display(path), "source_bytes": os.fsencode(path)}


def display(text: str) -> str:
    """`text` as valid UTF-8: bytes a path could not decode (lone surrogates) become U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # a surrogate no path decoding makes
            raw = text.encode("utf-8", "replace")
        return raw.decode("utf-8", "replace")


def source_path(row: dict[str, Any]) -> str:
    """The path a clip or reject row came from, exactly (as os.fsdecode names it); rows of schema 1
    have no `source_bytes`."""
    raw = row.get("source_bytes")
    return os.fsdecode(raw) if raw is not None else row["source"]


def clip_id(video_id: str, start_s: float, end_s: float) -> str:
    key = f"{video_id}:{start_s:.3f}:{end_s:.3f}".encode()
    return hashlib.sha1(key).hexdigest()[:16]


def clip_row(item: Item) -> dict[str, Any]:
    unknown = set(item.columns) - CLIP_COLUMNS
    if unknown:
        raise KeyError(f"columns not in lafid.schema: {sorted(unknown)}")
    row = dict(item.columns)
    row.update(
        schema_version=SCHEMA_VERSION,
        clip_id=clip_id(item.video_id, item.start_s, item.end_s),
        video_id=item.video_id,
        **source_columns(item.source),
        clip_index=item.clip_index,
        start_s=item.start_s,
        end_s=item.end_s,
    )
    return row


def reject_row(item: Item) -> dict[str, Any]:
    assert item.reject is not None
    whole_video = item.clip_index < 0
    return {
        "schema_version": SCHEMA_VERSION,
        "video_id": item.video_id,
        "clip_id": None if whole_video else clip_id(item.video_id, item.start_s, item.end_s),
        **source_columns(item.source),
        "clip_index": item.clip_index,
        "start_s": item.start_s,
        "end_s": item.end_s,
        "stage": item.reject.stage,
        "reason": item.reject.reason,
        "detail": display(item.reject.detail),  # details quote paths
        **{k: v for k, v in item.columns.items() if k in MEASURED_COLUMNS},
    }
