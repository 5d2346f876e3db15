"""Twenty-odd kinds of bad input in one Ray run: every input ends as rows, none twice.

Built from real footage (carphone, a photo) and broken on purpose: empty,
text, random bytes, cut at several points, overwritten in the middle, audio
only in four containers, an image, links to nothing and to themselves,
garbage audio packets, a clip too short to keep, black frames, a tiny frame,
a folder named like a video, file names that are not UTF-8, hold a newline or
are 255 bytes long.
Two healthy clips ride along and must be kept.
"""

from __future__ import annotations

import os

import av
import cv2
import numpy as np
import pytest

from lafid import media
from lafid.recipe import load_recipe
from lafid.shards import read_clips
from lafid.runner import curate
from lafid.schema import source_path

pytestmark = pytest.mark.ray



def _audio_in(path: str, fmt: str, codec: str = "aac") -> str:
    with av.open(path, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), np.float32 if codec == "aac" else np.int16),
                                           format="fltp" if codec == "aac" else "s16", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, carphone):
    d = tmp_path_factory.mktemp("bad_inputs")
    talk = carphone + carphone[::-1]
    healthy = media.write_video(str(d / "healthy.mp4"), talk, 29.97)
    voiced = media.write_video(str(d / "voiced.mp4"), talk, 29.97, audio=np.zeros(int(8 * 16000), np.float32))
    data = open(healthy, "rb").read()
    bad = {}

    def put(name: str, payload: bytes) -> None:
        (d / name).write_bytes(payload)
        bad[name] = str(d / name)

    put("empty.mp4", b"")
    put("text.mp4", b"not a video at all\n" * 20)
    put("random.mp4", np.random.default_rng(1).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    put("header_only.mp4", data[:1024])
    put("cut_90.mp4", data[: int(len(data) * 0.9)])
    middle = bytearray(data)
    middle[len(data) // 3: len(data) // 3 + 20_000] = bytes(20_000)
    put("zeroed_middle.mp4", bytes(middle))
    put("copy_of_healthy.mp4", data)
    bad["truncated.mp4"] = media.truncate(healthy, str(d / "truncated.mp4"), 0.5)
    bad["voice.m4a"] = media.write_audio_only(str(d / "voice.m4a"), np.zeros(16000, np.float32))
    bad["tone.wav"] = _audio_in(str(d / "tone.wav"), "wav", "pcm_s16le")
    bad["camcorder.mts"] = _audio_in(str(d / "camcorder.mts"), "mpegts")
    bad["phone.3gp"] = _audio_in(str(d / "phone.3gp"), "3gp")
    put("photo.mp4", cv2.imencode(".jpg", cv2.cvtColor(media.astronaut(), cv2.COLOR_RGB2BGR))[1].tobytes())
    os.symlink(d / "loop.mp4", d / "loop.mp4")
    bad["loop.mp4"] = str(d / "loop.mp4")
    os.symlink(d / "gone.mp4", d / "dangling.mp4")
    bad["dangling.mp4"] = str(d / "dangling.mp4")
    bad["missing.mp4"] = str(d / "missing.mp4")
    bad["garbage_audio.mp4"] = media.garbage_audio_copy(voiced, str(d / "garbage_audio.mp4"))
    bad["too_short.mp4"] = media.write_video(str(d / "too_short.mp4"), carphone[:12], 29.97)
    bad["black.mp4"] = media.write_video(str(d / "black.mp4"), [np.zeros((144, 176, 3), np.uint8)] * 120, 25.0)
    bad["tiny.mp4"] = media.write_video(str(d / "tiny.mp4"), media.resize(talk, 16, 16), 29.97)
    bad["no_face.mp4"] = media.write_video(str(d / "no_face.mp4"), media.no_face_frames(5.0), 25.0)
    (d / "folder.mp4").mkdir()
    bad["folder.mp4"] = str(d / "folder.mp4")
    odd_names = {b"no_face_caf\xe9.mp4": 4.0, b"no_face_new\nline.mp4": 3.5, b"L" * 251 + b".mp4": 3.0}
    for raw, seconds in odd_names.items():  # not UTF-8, a newline, the longest name allowed
        path = os.fsdecode(os.path.join(os.fsencode(d), raw))
        bad[os.path.basename(path)] = media.write_video(path, media.no_face_frames(seconds), 25.0)
    return [healthy, voiced], bad


def test_every_bad_input_has_a_row_and_healthy_clips_are_kept(ray_cluster, corpus, tmp_path):
    healthy, bad = corpus
    assert len(bad) >= 20
    inputs = healthy + list(bad.values())
    stats = curate(load_recipe("demo"), inputs, tmp_path, executor="ray")
    clips = read_clips(tmp_path).to_pylist()
    rejects = read_clips(tmp_path, kind="rejects").to_pylist()
    by_source: dict[str, list[str]] = {}
    for row in rejects:
        by_source.setdefault(os.path.basename(source_path(row)), []).append(row["reason"])
    kept = {os.path.basename(source_path(c)) for c in clips}
    assert {os.path.basename(h) for h in healthy} <= kept
    for name in bad:  # every bad input is explained, by a reason other than a crash
        assert name in by_source, (name, sorted(by_source))
        assert not {"stage_error", "worker_crashed"} & set(by_source[name]), (name, by_source[name])
        assert name not in kept or name == "copy_of_healthy.mp4", name
    assert by_source["copy_of_healthy.mp4"] == ["duplicate_content"]
    assert by_source["folder.mp4"] == ["not_a_file"]
    assert by_source["garbage_audio.mp4"] == ["corrupt_audio"]
    for name in ("voice.m4a", "tone.wav", "camcorder.mts", "phone.3gp"):
        assert by_source[name] == ["no_video_stream"], name
    # nothing written twice: one row per clip id, one whole-video reject per source at most
    assert len({c["clip_id"] for c in clips}) == len(clips)
    whole = [os.path.basename(r["source"]) for r in rejects if r["clip_index"] == -1]
    assert len(whole) == len(set(whole))
    assert stats.videos_done == len(inputs)
