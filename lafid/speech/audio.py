"""Extract a clip's audio once, as 16 kHz mono float32, with PyAV.

Every later step (VAD, ASR, speech envelope) reads this one array, so the
source is demuxed once per clip. Bad packets are counted instead of raised: a
few broken packets leave silence where they were, many make the clip's audio
unusable (`AudioError("corrupt_audio")`), and the caller decides what to do.
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import numpy as np

from lafid.video import MediaError, timeline_start

RATE = 16000


class AudioError(MediaError):
    """Audio that cannot be trusted; `reason` is a stable reject code."""


@dataclass
class ClipAudio:
    samples: np.ndarray  # float32 mono at RATE, exactly the clip's length
    packets: int
    bad_packets: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / RATE


def extract_audio(path: str, start_s: float, end_s: float, max_bad_ratio: float = 0.1) -> ClipAudio | None:
    """The clip's audio, or None when the file has no audio stream.

    Decoded frames are placed at their own timestamps, so gaps left by bad
    packets stay silent and never shift later speech against the video.
    """
    samples = np.zeros(max(0, int(round((end_s - start_s) * RATE))), dtype=np.float32)
    packets = bad = 0
    try:
        with av.open(path) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=RATE)
            origin = timeline_start(container)  # clip times are measured from it, as video frames are
            if start_s > 0:
                container.seek(int((start_s + origin) / stream.time_base), stream=stream, backward=True,
                               any_frame=False)
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packets += 1
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    bad += 1
                    continue
                if _place(samples, frames, resampler, start_s + origin, end_s + origin):
                    break
    except av.error.FFmpegError as exc:
        raise AudioError("corrupt_audio", f"{type(exc).__name__}: {exc}") from exc
    if packets and bad / packets > max_bad_ratio:
        raise AudioError("corrupt_audio", f"{bad} of {packets} audio packets failed to decode")
    return ClipAudio(samples, packets, bad)


def _place(buffer: np.ndarray, frames, resampler, start_s: float, end_s: float) -> bool:
    """Write decoded frames into `buffer` at their times; True once past the clip's end."""
    for frame in frames:
        if frame.time is None:
            continue
        if frame.time >= end_s:
            return True
        pcm = np.concatenate([f.to_ndarray().reshape(-1) for f in resampler.resample(frame)] or [np.zeros(0, np.float32)])
        offset = int(round((frame.time - start_s) * RATE))
        lo, hi = max(0, offset), min(len(buffer), offset + len(pcm))
        if hi > lo:
            buffer[lo:hi] = pcm[lo - offset:hi - offset]
    return False
