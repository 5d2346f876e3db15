"""The report's contact sheet: a few faces per EFHQ pose bucket, cut now from the source videos.

Each face is taken along its clip's subject track (`frame_box` at `frame_t`) and
cropped with the face toolkit's `square_crop`, the crop every face user shares.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow.compute as pc

from lafid.face.pose import BUCKETS
from lafid.report.collect import Run

CROP_PX = 112
CROP_MARGIN = 1.4  # the crop's side, times the face box's long side


def _pick_frames(run: Run, per_bucket: int) -> list[dict[str, Any]]:
    """Up to `per_bucket` clips per EFHQ bucket, each with its most typical frame in that bucket:
    the most frontal frame for `frontal`, the most extreme one for the others."""
    clips = run.clips
    need = {"frame_yaw", "frame_pitch", "frame_box", "frame_t", "start_s", "source", "clip_id"}
    if clips is None or not need <= set(clips.column_names) or clips.num_rows == 0:
        return []
    yaw_list = clips["frame_yaw"].combine_chunks()
    yaw = pc.list_flatten(yaw_list).to_numpy(zero_copy_only=False).astype(np.float64)
    pitch = pc.list_flatten(clips["frame_pitch"]).to_numpy(zero_copy_only=False).astype(np.float64)
    parent = pc.list_parent_indices(yaw_list).to_numpy(zero_copy_only=False)
    offsets = yaw_list.offsets.to_numpy()
    buckets = run.frame_buckets
    size = np.abs(yaw) + np.abs(pitch)
    picks = []
    for bucket in BUCKETS:
        idx = np.flatnonzero(buckets == bucket)
        order = idx[np.argsort(size[idx] if bucket == "frontal" else -size[idx], kind="stable")]
        seen: set[int] = set()
        for i in order:
            row = int(parent[i])
            if row in seen:
                continue
            seen.add(row)
            picks.append({"bucket": bucket, "row": row, "frame": int(i - offsets[row]),
                          "yaw": float(yaw[i]), "pitch": float(pitch[i])})
            if len(seen) == per_bucket:
                break
    if not picks:  # no face measured (a recipe without face_constraints)
        return []
    rows = clips.select(["clip_id", "source", "start_s", "frame_t", "frame_box"]).take([p["row"] for p in picks])
    for pick, rec in zip(picks, rows.to_pylist()):
        pick.update(clip_id=rec["clip_id"], source=rec["source"], t=float(rec["frame_t"][pick["frame"]]),
                    start_s=float(rec["start_s"]), box=rec["frame_box"][pick["frame"]])
    return picks


def _grab(source: str, at_s: float) -> np.ndarray | None:
    """The frame at `at_s` seconds on the source's timeline, as displayed and as the face stage read it
    (`lafid.video.sample_frames`), or None when the source cannot be read now."""
    import av

    from lafid.video import sample_frames

    try:
        for _, frame in sample_frames(source, max(0.0, at_s - 0.002), at_s + 1.0, 1000.0):
            return frame
    except (OSError, av.error.FFmpegError, IndexError, ValueError):
        return None
    return None


def sheet_crop(frame: np.ndarray, box: list[float]) -> np.ndarray:
    """The contact sheet's crop of a normalised x0,y0,x1,y1 box: square, CROP_MARGIN times its long side,
    CROP_PX wide, black outside the frame."""
    from lafid.face.detect import square_crop

    h, w = frame.shape[:2]
    pixels = [box[0] * w, box[1] * h, box[2] * w, box[3] * h]
    return square_crop(frame, pixels, CROP_PX, CROP_MARGIN, antialias=True)[0]


def contact_sheet(run: Run, per_bucket: int = 6) -> list[dict[str, Any]]:
    """Face crops cut now from the source videos along each picked clip's subject track."""
    sheet = []
    for pick in _pick_frames(run, per_bucket):
        box = pick.pop("box")
        frame = _grab(pick["source"], pick["start_s"] + pick["t"]) if box is not None else None
        pick.pop("row"), pick.pop("frame")
        pick["png"] = png(sheet_crop(frame, box)) if frame is not None else None
        sheet.append(pick)
    return sheet


def png(rgb: np.ndarray) -> bytes:
    """An RGB image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
