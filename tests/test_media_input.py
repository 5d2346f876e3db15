"""Source media as found in the wild: display rotation, variable frame rate,
symlinked folders and loops, audio-only containers, odd extensions."""

import os
import resource
import wave

import av
import numpy as np
import pytest

from lafid import media, video
from lafid.runner import list_sources
from lafid.video import probe, sample_frames
from lafid.stages.face_constraints import FaceConstraints
from lafid.stages.shot_split import ShotSplit

from conftest import clip_item, run_stage, video_item


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def phone_videos(media_dir, carphone):
    """Carphone stored sideways (as a phone held the other way records it): one file
    with a display rotation tag per rotation, and one untagged file with the same pixels."""
    out = {}
    for rotation in (90, 270):
        stored = [np.ascontiguousarray(np.rot90(f, k=-rotation // 90)) for f in carphone]
        out[rotation] = media.write_video(str(media_dir / f"phone_rot{rotation}.mp4"), stored, 29.97,
                                          rotation=rotation)
    stored = [np.ascontiguousarray(np.rot90(f, k=-1)) for f in carphone]
    out["untagged"] = media.write_video(str(media_dir / "phone_untagged.mp4"), stored, 29.97)
    return out


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_video_is_decoded_and_sized_as_displayed(phone_videos, carphone, rotation):
    info = probe(phone_videos[rotation])
    assert (info.width, info.height, info.rotation) == (176, 144, rotation)
    frames = [f for _, f in sample_frames(phone_videos[rotation], 0.0, 1.0, 5.0)]
    assert len(frames) == 5 and frames[0].shape == carphone[0].shape
    assert _diff(frames[0], carphone[0]) < 8  # upright, as shown by a player
    assert _diff(frames[0], np.rot90(carphone[0], 2)) > 25  # not upside down
    small = next(sample_frames(phone_videos[rotation], 0.0, 1.0, 5.0, max_side=88))[1]
    assert small.shape[:2] == (72, 88)
    untagged = probe(phone_videos["untagged"])
    assert (untagged.width, untagged.height, untagged.rotation) == (144, 176, 0)


def test_phone_video_stored_sideways_is_kept_by_face_constraints(phone_videos):
    stage = FaceConstraints({"sample_fps": 5.0, "min_yaw_range": 0.0, "min_blur": 0.0})
    kept, sideways = run_stage(stage, [clip_item(phone_videos[90]), clip_item(phone_videos["untagged"])])
    assert not kept.rejected, kept.reject
    assert kept.columns["face_ratio"] >= 0.95
    # control: the same pixels without the rotation applied are what a decoder
    # ignoring the tag sees, and the face is lost
    assert sideways.rejected and sideways.reject.reason == "face_missing"


def test_frames_are_sampled_by_timestamp_in_variable_frame_rate_video(media_dir, carphone):
    talk = media.resize(carphone, 256, 256)[:40]
    hopper = media.still(media.grace_hopper(), 3.0, fps=30.0)
    times = [i / 10 for i in range(40)] + [4.0 + i / 30 for i in range(90)]
    path = media.write_video(str(media_dir / "vfr_sample.mp4"), talk + hopper, times=times)
    sampled = list(sample_frames(path, 3.0, 5.0, 5.0))
    assert np.allclose([t for t, _ in sampled], np.arange(10) * 0.2, atol=1e-3)
    for t, frame in sampled:
        is_hopper = _diff(frame, hopper[0]) < _diff(frame, talk[-1])
        assert is_hopper == (t >= 1.0 - 1e-6), t


def _write_wav(path, seconds=1.0):
    tone = (np.sin(np.linspace(0, 2 * np.pi * 440 * seconds, int(16000 * seconds))) * 8000).astype(np.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone.tobytes())
    return str(path)


def _write_audio(path, fmt):
    with av.open(str(path), "w", format=fmt) as out:
        media._mux_audio(out, media._audio_stream(out), np.zeros(16000, np.float32))
    return str(path)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, make_video, carphone):
    """videos/ with nested media of many kinds, a symlinked folder, a symlink loop,
    a self-referencing file link and a dangling link; outside/ reached only through a link."""
    root = tmp_path_factory.mktemp("tree")
    videos, outside = root / "videos", root / "outside"
    (videos / "sub").mkdir(parents=True)
    outside.mkdir()
    clip = make_video("carphone", lambda: carphone, 29.97)
    os.symlink(clip, videos / "talk.mp4")
    os.symlink(clip, outside / "linked_in.mov")
    media.write_audio_only(str(videos / "voice.m4a"), np.zeros(16000, np.float32))
    _write_wav(videos / "sub" / "tone.wav")
    _write_audio(videos / "sub" / "camcorder.MTS", "mpegts")
    _write_audio(videos / "sub" / "phone.3gp", "3gp")
    (videos / "notes.txt").write_text("not media\n")
    os.symlink(outside, videos / "linked_dir")
    os.symlink(videos, videos / "sub" / "loop")  # a folder that contains itself
    os.symlink(videos / "self.mp4", videos / "self.mp4")  # a file link to itself
    os.symlink(root / "gone.mp4", videos / "dangling.mp4")
    odd = root / "recording.dat"  # given by name: tried whatever its extension
    odd.write_bytes(open(clip, "rb").read())
    return root


def test_folder_scan_follows_symlinked_folders_and_lists_audio_containers(tree, monkeypatch):
    monkeypatch.chdir(tree)
    sources = list_sources(["videos", "videos/talk.mp4", "recording.dat"])
    names = [os.path.relpath(s, tree) for s in sources]
    assert names == [
        "videos/dangling.mp4",
        "videos/linked_dir/linked_in.mov",
        "videos/self.mp4",
        "videos/sub/camcorder.MTS",
        "videos/sub/phone.3gp",
        "videos/sub/tone.wav",
        "videos/talk.mp4",
        "videos/voice.m4a",
        "recording.dat",
    ]
    assert all(os.path.isabs(s) for s in sources)  # stored absolute, once each


def test_every_listed_input_gets_a_clip_or_a_reason(tree):
    sources = list_sources([str(tree / "videos"), str(tree / "recording.dat")])
    results = {os.path.basename(s): out for s in sources for out in [run_stage(ShotSplit({"min_clip_s": 0.5}),
                                                                               [video_item(s)])]}
    reasons = {name: {i.reject.reason for i in out if i.rejected} for name, out in results.items()}
    for name in ("voice.m4a", "tone.wav", "camcorder.MTS", "phone.3gp"):
        assert reasons[name] == {"no_video_stream"}, name
    assert reasons["self.mp4"] == {"symlink_loop"}
    assert reasons["dangling.mp4"] == {"broken_symlink"}
    for name in ("talk.mp4", "linked_in.mov", "recording.dat"):
        assert not reasons[name] and len(results[name]) == 1 and results[name][0].end_s > 3.9, name


def test_clip_times_frames_and_audio_share_the_source_timeline(media_dir, carphone):
    """Video that starts 1 s into the file (audio from 0 s); a cut to a portrait at 3 s,
    where a tone starts in the audio."""
    from lafid.speech.audio import RATE, extract_audio

    talk = media.resize(carphone, 128, 128)[:60]
    hopper = media.still(media.grace_hopper(), 2.0, fps=30.0, size=128)
    times = [1.0 + i / 30 for i in range(120)]
    audio = np.zeros(5 * RATE, np.float32)
    audio[3 * RATE:] = 0.3 * np.sin(np.arange(2 * RATE) * 2 * np.pi * 440 / RATE)
    path = media.write_video(str(media_dir / "late_video.mp4"), talk + hopper, audio=audio, times=times)
    first, second = run_stage(ShotSplit({"min_clip_s": 0.5}), [video_item(path)])
    assert (first.start_s, second.start_s) == pytest.approx((1.0, 3.0), abs=1e-3)
    assert second.end_s == pytest.approx(5.0, abs=1e-3)
    t, frame = next(sample_frames(path, second.start_s, second.end_s, 5.0))
    assert t == pytest.approx(0.0, abs=1e-3) and _diff(frame, hopper[0]) < _diff(frame, talk[-1])

    def rms(clip, a, b):
        samples = extract_audio(path, clip.start_s, clip.end_s).samples
        return float(np.sqrt(np.mean(samples[int(a * RATE):int(b * RATE)] ** 2)))

    assert rms(first, 1.6, 1.9) < 0.01  # silence until the cut ...
    assert rms(second, 0.05, 0.3) > 0.1  # ... the tone right after it


def test_frames_are_converted_on_the_decoding_thread(make_video, carphone, monkeypatch):
    """PyAV's default conversion makes and ends a scaler thread pool for every frame: the decoding thread
    then waits for it on every frame, and for a free core where Ray actors keep the others busy. With one
    scaler thread it waits only for the decoder. Control: two scaler threads (PyAV's default on 2 cores)."""
    path = make_video("carphone", lambda: carphone, 29.97)

    def waits_per_frame(threads: int) -> float:
        monkeypatch.setattr(video, "SCALER_THREADS", threads)
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
        frames = sum(1 for _ in sample_frames(path, 0.0, 60.0, fps=30.0))
        return (resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before) / frames

    one, two = waits_per_frame(1), waits_per_frame(2)
    print(f"\nvoluntary context switches of the decoding thread per frame: one scaler thread {one:.2f}, two {two:.2f}")
    assert two - one > 1.5  # measured 2.2-2.6 more waits per frame on an idle machine, 2.0-3.6 beside a busy core
