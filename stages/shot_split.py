"""Shot split: cut a source video into single-shot clips with PySceneDetect.

One decode pass runs the cut detector and records each frame's mean luma, so
black or faded frames at shot edges are trimmed without reading the video again.
Shots longer than `max_clip_s` are split into equal parts; shorter than
`min_clip_s` become reject rows.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import Field
from scenedetect import AdaptiveDetector, ContentDetector, SceneDetector, SceneManager, open_video

from lafid.item import Item
from lafid.stage import Resources, Stage, StageParams
from lafid.video import MediaError, VideoInfo, probe


class ShotSplitParams(StageParams):
    detector: Literal["adaptive", "content"] = Field("adaptive", description="PySceneDetect detector: adaptive or content")
    threshold: float | None = Field(None, gt=0, description="detector threshold; None = detector default")
    min_scene_frames: int = Field(15, ge=1, description="shortest shot the detector may report")
    min_clip_s: float = Field(2.0, ge=0, description="shorter clips become `too_short` rejects")
    max_clip_s: float = Field(10.0, gt=0, description="longer shots are split into equal parts")
    dark_luma: float = Field(16.0, ge=0, description="edge frames darker than this mean luma (0-255) are trimmed; 0 = off")
    min_frames_ratio: float = Field(0.9, gt=0, le=1, description="decoded/declared frames below this = truncated")


class LumaRecorder(SceneDetector):
    """Records each frame's mean brightness during the cut-detection pass; reports no cuts."""

    def __init__(self):
        super().__init__()
        self.values: list[float] = []

    def process_frame(self, timecode, frame_img):
        self.values.append(float(frame_img.mean()))
        return []


class ShotSplit(Stage):
    name = "shot_split"
    Params = ShotSplitParams
    default_resources = Resources(cpus=1)

    def process_item(self, item: Item) -> list[Item]:
        p: ShotSplitParams = self.params
        try:
            info = probe(item.source)
            shots, luma = self._detect(item.source, info)
        except MediaError as err:
            return [item.drop(self.name, err.reason, err.detail)]
        decoded = len(luma)
        if info.frame_count and decoded < p.min_frames_ratio * info.frame_count:
            return [item.drop(self.name, "truncated", f"decoded {decoded} of {info.frame_count} declared frames")]
        clips: list[tuple[int, int, str | None]] = []
        for start, end in shots:
            start, end = self._trim_dark(luma, start, end)
            if end - start <= 0:
                clips.append((start, max(end, start), "dark_shot"))
                continue
            for a, b in self._split_long(start, end, info.fps):
                short = (b - a) / info.fps < p.min_clip_s
                clips.append((a, b, "too_short" if short else None))
        base = {
            "fps": info.fps,
            "width": info.width,
            "height": info.height,
            "has_audio": info.has_audio,
        }
        out = []
        for index, (a, b, reason) in enumerate(clips):
            clip = Item(
                source=item.source,
                video_id=item.video_id,
                clip_index=index,
                clip_count=len(clips),
                start_s=a / info.fps,
                end_s=b / info.fps,
                columns={**base, "start_frame": a, "end_frame": b},
            )
            if reason:
                clip.drop(self.name, reason, f"frames {a}-{b} ({(b - a) / info.fps:.2f}s)")
            out.append(clip)
        if not out:
            return [item.drop(self.name, "no_shots", "no frames left after trimming")]
        return out

    def _detect(self, path: str, info: VideoInfo) -> tuple[list[tuple[int, int]], np.ndarray]:
        p: ShotSplitParams = self.params
        if p.detector == "adaptive":
            kwargs = {"adaptive_threshold": p.threshold} if p.threshold else {}
            detector = AdaptiveDetector(min_scene_len=p.min_scene_frames, **kwargs)
        else:
            kwargs = {"threshold": p.threshold} if p.threshold else {}
            detector = ContentDetector(min_scene_len=p.min_scene_frames, **kwargs)
        luma = LumaRecorder()
        try:
            video = open_video(path, backend="pyav")
            manager = SceneManager()
            manager.auto_downscale = True
            manager.add_detector(detector)
            manager.add_detector(luma)
            manager.detect_scenes(video)
            scenes = manager.get_scene_list(start_in_scene=True)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a reject reason
            raise MediaError("decode_error", f"{type(exc).__name__}: {exc}") from exc
        shots = [(s.frame_num, e.frame_num) for s, e in scenes]
        if not shots and luma.values:
            shots = [(0, len(luma.values))]
        return shots, np.asarray(luma.values, dtype=np.float32)

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

    def _split_long(self, start: int, end: int, fps: float) -> list[tuple[int, int]]:
        limit = int(self.params.max_clip_s * fps)
        parts = max(1, math.ceil((end - start) / limit))
        bounds = np.linspace(start, end, parts + 1).round().astype(int)
        return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))
