"""Shot split: cut a source video into single-shot clips with PySceneDetect.

One decode pass runs the cut detector and records each frame's timestamp and
mean luma, so black or faded frames at shot edges are trimmed without reading
the video again. Clip times come from the frames' timestamps (not frame index
over the average rate), so variable-frame-rate sources are cut where the shot
changes. Shots longer than `max_clip_s` are split into equal parts; shorter
than `min_clip_s` become reject rows.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field
from scenedetect import AdaptiveDetector, ContentDetector, SceneDetector, SceneManager
from scenedetect.backends.pyav import VideoStreamAv

from lafid.item import Item
from lafid.stage import Resources, Stage, StageParams
from lafid.video import SCALER_THREADS, MediaError, VideoInfo, probe


class ShotSplitParams(StageParams):
    detector: Literal["adaptive", "content"] = Field("adaptive", description="PySceneDetect detector: adaptive or content")
    threshold: float | None = Field(None, gt=0, description="detector threshold; None = detector default")
    min_scene_frames: int = Field(15, ge=1, description="shortest shot the detector may report")
    min_clip_s: float = Field(2.0, ge=0, description="shorter clips become `too_short` rejects")
    max_clip_s: float = Field(10.0, gt=0, description="longer shots are split into equal parts")
    dark_luma: float = Field(16.0, ge=0, description="edge frames darker than this mean luma (0-255) are trimmed; 0 = off")
    min_frames_ratio: float = Field(0.9, gt=0, le=1, description="decoded/declared frames below this = truncated")


class FrameRecorder(SceneDetector):
    """Records each frame's time (seconds from the stream's start, from its pts) and
    mean brightness during the cut-detection pass; reports no cuts."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []
        self.values: list[float] = []

    def process_frame(self, timecode, frame_img):
        self.times.append(float(timecode.seconds))
        self.values.append(float(frame_img.mean()))
        return []


class PyAVStream(VideoStreamAv):
    """PySceneDetect's PyAV stream, its frames converted with `SCALER_THREADS` (see lafid.video)."""

    def read(self, decode: bool = True) -> np.ndarray | bool:
        got = super().read(decode=False)
        if got is False or not decode:
            return got
        return self._frame.to_ndarray(format="bgr24", threads=SCALER_THREADS)


class ShotSplit(Stage):
    name = "shot_split"
    Params = ShotSplitParams
    default_resources = Resources(cpus=1)
    writes = ("fps", "width", "height", "has_audio", "start_frame", "end_frame")
    THRESHOLDS = frozenset({"min_clip_s"})
    MEASURE_PARAMS = frozenset({"detector", "threshold", "min_scene_frames", "max_clip_s", "dark_luma",
                                "min_frames_ratio"})
    DECISIONS = frozenset({"too_short"})
    DECIDES_ON = ("start_s", "end_s", "start_frame", "end_frame")

    def process_item(self, item: Item) -> list[Item]:
        p: ShotSplitParams = self.params
        try:
            info = probe(item.source)
            shots, times, luma = self._detect(item.source, info)
        except MediaError as err:
            return [item.drop(self.name, err.reason, err.detail)]
        decoded = len(luma)
        if info.frame_count and decoded < p.min_frames_ratio * info.frame_count:
            return [item.drop(self.name, "truncated", f"decoded {decoded} of {info.frame_count} declared frames")]
        clips: list[tuple[int, int, bool]] = []  # first frame, frame after the last, all dark
        for start, end in shots:
            start, end = self._trim_dark(luma, start, end)
            if end - start <= 0:
                clips.append((start, max(end, start), True))
                continue
            clips.extend((a, b, False) for a, b in self._split_long(times, start, end))
        base = {
            "fps": info.fps,
            "width": info.width,
            "height": info.height,
            "has_audio": info.has_audio,
        }
        out = []
        for index, (a, b, dark) in enumerate(clips):
            clip = Item(
                source=item.source,
                video_id=item.video_id,
                clip_index=index,
                clip_count=len(clips),
                start_s=float(times[a]),
                end_s=float(times[b]),
                columns={**base, "start_frame": a, "end_frame": b},
            )
            if dark:
                out.append(clip.drop(self.name, "dark_shot", f"frames {a}-{b} ({times[b] - times[a]:.2f}s)"))
            else:
                out.extend(self.conclude(clip))
        if not out:
            return [item.drop(self.name, "no_shots", "no frames left after trimming")]
        return out

    def decide(self, c: dict) -> tuple[str, str] | None:
        duration = c["end_s"] - c["start_s"]
        if duration < self.params.min_clip_s:
            return "too_short", f"frames {c['start_frame']}-{c['end_frame']} ({duration:.2f}s)"
        return None

    def _detect(self, path: str, info: VideoInfo) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
        """Shots as (first frame, frame after the last) in decode order; each frame's
        start time plus, at the end, when the last frame stops being shown; mean lumas."""
        p: ShotSplitParams = self.params
        if p.detector == "adaptive":
            kwargs = {"adaptive_threshold": p.threshold} if p.threshold else {}
            detector = AdaptiveDetector(min_scene_len=p.min_scene_frames, **kwargs)
        else:
            kwargs = {"threshold": p.threshold} if p.threshold else {}
            detector = ContentDetector(min_scene_len=p.min_scene_frames, **kwargs)
        luma = FrameRecorder()
        try:
            video = PyAVStream(path)
            manager = SceneManager()
            manager.auto_downscale = True
            manager.add_detector(detector)
            manager.add_detector(luma)
            manager.detect_scenes(video)
            scenes = manager.get_scene_list(start_in_scene=True)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject reason
            raise MediaError("decode_error", f"{type(exc).__name__}: {exc}") from exc
        times = _frame_times(luma.times, info)
        n = len(luma.values)
        starts = sorted({_frame_at(times[:n], s.seconds + info.video_start_s) for s, _ in scenes} | {0}) if n else []
        shots = list(zip(starts, starts[1:] + [n]))
        return shots, times, np.asarray(luma.values, dtype=np.float32)

    def _trim_dark(self, luma: np.ndarray, start: int, end: int) -> tuple[int, int]:
        threshold = self.params.dark_luma
        if threshold <= 0:
            return start, end
        end = min(end, len(luma))
        while start < end and luma[start] < threshold:
            start += 1
        while end > start and luma[end - 1] < threshold:
            end -= 1
        return start, end

    def _split_long(self, times: np.ndarray, start: int, end: int) -> list[tuple[int, int]]:
        """Equal parts in time, cut at the frames nearest the part boundaries."""
        duration = times[end] - times[start]
        parts = max(1, math.ceil(duration / self.params.max_clip_s - 1e-9))
        targets = np.linspace(times[start], times[end], parts + 1)[1:-1]
        inner = [_frame_at(times[start:end], t) + start for t in targets]
        bounds = [start] + sorted(set(b for b in inner if start < b < end)) + [end]
        return list(zip(bounds[:-1], bounds[1:]))


def _frame_times(starts: list[float], info: VideoInfo) -> np.ndarray:
    """Frame start times on the source's timeline (see lafid.video) plus one entry for
    the end of the last frame (as long as the frame before it, or 1/fps when alone)."""
    times = np.asarray(starts, dtype=np.float64)
    if len(times) == 0:
        return np.zeros(1)
    if len(times) > 1 and (np.diff(times) <= 0).any():  # timestamps missing or out of order
        times = np.arange(len(times)) / info.fps
    last = times[-1] - times[-2] if len(times) > 1 else 1.0 / info.fps
    # the detector measures from the first video frame; clips are on the source's timeline
    return np.append(times, times[-1] + max(last, 0.0)) + info.video_start_s


def _frame_at(times: np.ndarray, seconds: float) -> int:
    """Index of the frame whose start time is nearest `seconds`."""
    return int(np.abs(times - seconds).argmin())
