"""Shot split on generated cuts between real footage, and bad inputs."""

import resource

import pytest

from lafid import media
from lafid.stages import shot_split
from lafid.stages.shot_split import ShotSplit

from conftest import run_stage, video_item


def test_hard_cuts_are_found_within_one_frame(make_video, carphone):
    talk = media.resize(carphone, 256, 256)
    hopper = media.still(media.grace_hopper(), 50 / 29.97, fps=29.97)
    astro = media.still(media.astronaut(), 70 / 29.97, fps=29.97)
    frames = talk[:60] + hopper + astro
    path = make_video("three_shots", lambda: frames, 29.97)
    clips = run_stage(ShotSplit({"min_clip_s": 0.5}), [video_item(path)])
    starts = [c.columns["start_frame"] for c in clips]
    ends = [c.columns["end_frame"] for c in clips]
    assert len(clips) == 3, starts
    for found, expected in zip(starts[1:], [60, 110]):
        assert abs(found - expected) <= 1
    assert ends[-1] == len(frames)
    assert all(c.clip_count == 3 and not c.rejected for c in clips)
    assert [c.clip_index for c in clips] == [0, 1, 2]


def test_long_shots_are_split_and_short_ones_rejected(make_video, carphone):
    path = make_video("carphone", lambda: carphone, 29.97)
    clips = run_stage(ShotSplit({"min_clip_s": 0.5, "max_clip_s": 1.5}), [video_item(path)])
    lengths = [c.end_s - c.start_s for c in clips]
    assert len(clips) == 3 and all(1.2 < n <= 1.5 for n in lengths)
    (short,) = run_stage(ShotSplit({"min_clip_s": 5.0}), [video_item(path)])
    assert short.reject.reason == "too_short"


def test_frames_are_converted_without_a_scaler_thread_pool_each(make_video, carphone, monkeypatch):
    """PySceneDetect's PyAV stream converts with PyAV's default, a scaler thread pool made and ended for every
    frame; the stage's stream converts on its decoding thread: the same cuts, fewer waits per frame.
    Control: two scaler threads (PyAV's default on 2 cores)."""
    path = make_video("carphone", lambda: carphone, 29.97)

    def run(threads: int) -> tuple[list, float]:
        monkeypatch.setattr(shot_split, "SCALER_THREADS", threads)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
        clips = run_stage(ShotSplit({"min_clip_s": 0.5, "max_clip_s": 1.5}), [video_item(path)])
        waits = (resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before) / len(carphone)
        return [(c.columns["start_frame"], c.columns["end_frame"]) for c in clips], waits

    (cuts, one), (control_cuts, two) = run(1), run(2)
    print(f"\nvoluntary context switches per frame: one scaler thread {one:.2f}, two {two:.2f}")
    assert cuts == control_cuts and len(cuts) > 1
    assert two - one > 2.0  # measured 3.1-5.5 more waits per frame


def test_dark_frames_at_shot_edges_are_trimmed(make_video, carphone):
    black = [carphone[0] * 0 for _ in range(15)]
    path = make_video("fade_in_out", lambda: black + carphone + black, 29.97)
    clips = run_stage(ShotSplit({"min_clip_s": 0.5}), [video_item(path)])
    (clip,) = [c for c in clips if not c.rejected]
    # a fade from black may be cut as its own shot: it is then rejected as dark, not kept
    assert all(c.reject.reason == "dark_shot" for c in clips if c.rejected)
    assert abs(clip.columns["start_frame"] - 15) <= 1
    assert abs(clip.columns["end_frame"] - (15 + len(carphone))) <= 1


@pytest.fixture(scope="module")
def bad_inputs(media_dir, make_video, carphone):
    good = make_video("carphone", lambda: carphone, 29.97)
    zero = media_dir / "zero.mp4"
    zero.write_bytes(b"")
    text = media_dir / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    audio = media.write_audio_only(str(media_dir / "audio_only.m4a"), media.no_face_frames(1.0)[0][:, :, 0].ravel() / 255)
    truncated = media.truncate(good, str(media_dir / "truncated.mp4"), 0.5)
    return {
        "empty_file": str(zero),
        "undecodable": str(text),
        "no_video_stream": audio,
        "truncated": truncated,
        "missing_file": str(media_dir / "does_not_exist.mp4"),
    }


def test_bad_inputs_become_rejects_with_reasons(bad_inputs):
    items = run_stage(ShotSplit(), [video_item(p) for p in bad_inputs.values()])
    assert len(items) == len(bad_inputs)
    for expected, item in zip(bad_inputs, items):
        assert item.rejected and item.clip_index == -1
        # a file cut in half may fail at open (moov atom lost) or mid-stream
        allowed = {"truncated", "undecodable", "decode_error"} if expected == "truncated" else {expected}
        assert item.reject.reason in allowed, (expected, item.reject)
        assert item.reject.detail


def test_variable_frame_rate_cut_is_timed_by_frame_timestamps(media_dir, carphone):
    """10 fps talking head for 4 s, then a hard cut to a 30 fps portrait for 3 s."""
    talk = media.resize(carphone, 256, 256)[:40]
    hopper = media.still(media.grace_hopper(), 3.0, fps=30.0)
    times = [i / 10 for i in range(40)] + [4.0 + i / 30 for i in range(90)]
    path = media.write_video(str(media_dir / "vfr_cut.mp4"), talk + hopper, times=times)
    first, second = run_stage(ShotSplit({"min_clip_s": 0.5}), [video_item(path)])
    assert not first.rejected and not second.rejected
    frame = 1 / 30  # the shorter frame duration on either side of the cut
    assert abs(second.columns["start_frame"] - 40) <= 1
    assert abs(first.end_s - 4.0) <= frame + 1e-6 and abs(second.start_s - 4.0) <= frame + 1e-6
    assert first.start_s == 0.0 and abs(second.end_s - 7.0) <= frame + 1e-6
    # control: frame index over the average frame rate puts the cut about 2 s early
    fps = second.columns["fps"]
    assert 17 < fps < 20 and abs(second.columns["start_frame"] / fps - 4.0) > 1.5


def test_variable_frame_rate_long_shot_is_split_into_equal_times(media_dir, carphone):
    """One shot whose frame rate drops from 30 to 10 fps halfway: equal parts in seconds."""
    frames = media.resize(carphone, 128, 128)[:90]
    times = [i / 30 for i in range(60)] + [2.0 + i / 10 for i in range(30)]
    path = media.write_video(str(media_dir / "vfr_long.mp4"), frames, times=times)
    clips = run_stage(ShotSplit({"min_clip_s": 0.5, "max_clip_s": 2.5}), [video_item(path)])
    assert [(round(c.start_s, 2), round(c.end_s, 2)) for c in clips] == [(0.0, 2.5), (2.5, 5.0)]
    assert [c.columns["end_frame"] for c in clips] == [65, 90]
