"""Probing and streaming decode of source videos (PyAV, which bundles FFmpeg).

Nothing here loads a whole video: `probe` reads headers and one frame, and
`sample_frames` yields frames at a chosen rate while decoding forward.

Times come from frame timestamps (pts), measured from the start of the source's
timeline (`timeline_start`, as `ffmpeg -ss` measures), so variable-frame-rate
sources place every frame where it is shown and audio (lafid.speech.audio)
lines up with video. Frames are
returned as displayed: a display-matrix rotation (phone footage stored sideways)
is applied, and `probe` reports width and height after it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Iterator

import av
import numpy as np

_ID_CHUNK = 1 << 20
# Threads for PyAV's pixel-format conversion (`to_ndarray`). Its default, 0, makes and ends a scaler thread
# pool for every frame: that costs more CPU than the conversion itself, and where the other cores are busy
# (a Ray actor beside others) every frame waits for a core. One thread gives the same pixels.
SCALER_THREADS = 1


class MediaError(Exception):
    """A source that cannot be used; `reason` is the reject code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float
    fps: float
    frame_count: int
    width: int
    height: int
    has_audio: bool
    codec: str
    rotation: int = 0  # degrees counter-clockwise applied to stored frames for display
    video_start_s: float = 0.0  # first video timestamp on the source's timeline

    def as_dict(self) -> dict:
        return asdict(self)


def content_id(path: str) -> str:
    """Hash of size plus the first and last MiB: stable across renames and copies. Only a regular file
    is read (opening a named pipe waits for a writer forever); anything else is named by its path."""
    by_path = "path-" + hashlib.sha1(os.fsencode(os.path.abspath(path))).hexdigest()[:11]
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return by_path
        size = os.path.getsize(path)
        digest = hashlib.sha1(str(size).encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(_ID_CHUNK))
            if size > 2 * _ID_CHUNK:
                fh.seek(-_ID_CHUNK, os.SEEK_END)
                digest.update(fh.read(_ID_CHUNK))
        return digest.hexdigest()[:16]
    except OSError:
        return by_path


def probe(path: str) -> VideoInfo:
    """Read stream facts and decode one frame; raise `MediaError` on unusable input."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MediaError("symlink_loop", f"symbolic links loop back on themselves: {path}") from exc
        if os.path.islink(path):
            raise MediaError("broken_symlink", f"symbolic link to a missing file: {path} -> {os.readlink(path)}") from exc
        if exc.errno == errno.ENOENT:
            raise MediaError("missing_file", f"no such file: {path}") from exc
        raise MediaError("unreadable", f"{exc.strerror}: {path}") from exc
    if os.path.isdir(path):
        raise MediaError("not_a_file", f"a folder, not a video file: {path}")
    if not os.path.isfile(path):
        raise MediaError("not_a_file", f"not a regular file (a pipe, socket or device): {path}")
    if not os.access(path, os.R_OK):
        raise MediaError("unreadable", f"not a readable file: {path}")
    if os.path.getsize(path) == 0:
        raise MediaError("empty_file", f"zero-byte file: {path}")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
                raise MediaError("no_video_stream", f"streams present: {kinds}")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or Fraction(25)
            fps = float(rate)
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            frames = stream.frames or int(round(duration * fps))
            first = next(container.decode(stream), None)
            if first is None:
                raise MediaError("undecodable", "the video stream yields no frames")
            width = stream.codec_context.width or first.width
            height = stream.codec_context.height or first.height
            rotation = frame_rotation(first)
            video_start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
            if rotation % 180:
                width, height = height, width
            return VideoInfo(
                duration_s=duration,
                fps=fps,
                frame_count=frames,
                width=width,
                height=height,
                has_audio=bool(container.streams.audio),
                codec=stream.codec_context.name,
                rotation=rotation,
                video_start_s=video_start - timeline_start(container),
            )
    except MediaError:
        raise
    except (av.error.FFmpegError, StopIteration, ValueError, OSError) as exc:
        raise MediaError("undecodable", f"{type(exc).__name__}: {exc}") from exc


def sample_frames(
    path: str, start_s: float, end_s: float, fps: float, max_side: int = 0
) -> Iterator[tuple[float, np.ndarray]]:
    """Yield (seconds from `start_s`, RGB frame) at about `fps`, decoding forward once.

    Times are frame timestamps on the source's timeline, so a frame is taken at
    (or just after) every multiple of 1/`fps` whatever the source's frame rate.
    `max_side` > 0 downsizes frames (keeping aspect) inside FFmpeg's scaler.
    Frames are rotated as displayed (see `frame_rotation`).
    """
    step = 1.0 / fps
    next_t = start_s
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        origin = timeline_start(container)
        if start_s > 0:
            container.seek(int((start_s + origin) / stream.time_base), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * stream.time_base) - origin
            if t >= end_s - 1e-6:
                break
            if t + 1e-6 < next_t:
                continue
            width, height = frame.width, frame.height
            scale = max_side / max(width, height) if max_side else 1.0
            if scale < 1.0:
                width, height = int(round(width * scale)) // 2 * 2, int(round(height * scale)) // 2 * 2
            rgb = frame.to_ndarray(format="rgb24", width=width, height=height, threads=SCALER_THREADS)
            yield t - start_s, displayed(rgb, frame_rotation(frame))
            while next_t <= t + 1e-6:
                next_t += step


def timeline_start(container) -> float:
    """Where the source's timeline starts, in seconds: the earliest stream start.
    Every time lafid reports, for video and audio alike, is measured from it."""
    start = container.start_time
    return start / av.time_base if start is not None else 0.0


def frame_rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation of a decoded frame in degrees (0, 90, 180, 270),
    from its display matrix; 0 when there is none."""
    try:
        degrees = frame.rotation
    except (AttributeError, ValueError):
        return 0
    return int(round((degrees or 0) / 90.0)) % 4 * 90


def displayed(rgb: np.ndarray, rotation: int) -> np.ndarray:
    """Stored frame -> frame as shown, for a counter-clockwise `rotation` in degrees."""
    if not rotation:
        return rgb
    return np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
