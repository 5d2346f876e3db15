"""Speech Disambiguation on clips built from real faces and espeak-ng speech.

These clips check VAD, ASR, the labels that need no lip/voice sync (voice-over
under a still face, silence, mouthing, no audio) and captions. Whether moving
lips belong to the voice is judged on real talking footage only
(tests/test_speech_real.py): a fixture that builds speech from the measured
mouth would agree with the sync measure by construction. Media and model are
built once per session.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jiwer
import numpy as np
import pyarrow as pa
import pytest

from lafid import media
from lafid.item import Item
from lafid.schema import CLIP_SCHEMA, clip_row
from lafid.speech.asr import ASRError, FasterWhisperASR, WhisperXASR, embedded_whisper_dir
from lafid.speech.audio import RATE
from lafid.speech.captions import disambiguate
from lafid.stage import StageWorker
from lafid.video import content_id
from lafid.stages.face_constraints import FaceConstraints
from lafid.stages.shot_split import ShotSplit
from lafid.stages.speech_disambiguation import SpeechDisambiguation

FPS = 29.97
SECONDS = 8.0
SENTENCES = ["The quick brown fox jumps over the lazy dog near the riverbank.",
             "She sells sea shells by the sea shore every summer."]
LABELS = {"voice_over": "voice_over", "mouthing": "mouthing", "silent": "silent", "no_audio": "no_audio",
          "long_silence": "voice_over"}


def wer(reference: str, hypothesis: str) -> float:
    norm = jiwer.Compose([jiwer.ToLowerCase(), jiwer.RemovePunctuation(), jiwer.RemoveMultipleSpaces(),
                          jiwer.Strip(), jiwer.ReduceToListOfListOfWords()])
    return jiwer.wer(reference, hypothesis, reference_transform=norm, hypothesis_transform=norm)


def fit(audio: np.ndarray, seconds: float, lead_s: float = 0.0) -> np.ndarray:
    """`audio` after `lead_s` of silence, cut or padded to `seconds`."""
    out = np.zeros(int(seconds * RATE), np.float32)
    lead = int(lead_s * RATE)
    n = min(len(audio), len(out) - lead)
    out[lead:lead + n] = audio[:n]
    return out



@pytest.fixture(scope="session")
def whisper_dir(tmp_path_factory):
    return embedded_whisper_dir(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def upstream():
    """ShotSplit + FaceConstraints at 15 fps (speech clips need a fine lip signal)."""
    split, faces = StageWorker(ShotSplit()), StageWorker(FaceConstraints({"sample_fps": 15.0}))

    def run(path: str) -> list[Item]:
        items, _ = split.run([Item(source=path, video_id=content_id(path))])
        items, _ = faces.run(items)
        return items

    yield run
    split.close()
    faces.close()


@pytest.fixture(scope="session")
def clips(tmp_path_factory, upstream):
    """name -> upstream-processed items, for every clip kind the stage must label."""
    folder = tmp_path_factory.mktemp("speech_media")
    talk = media.carphone_frames()
    talk = talk + talk[::-1]  # 8 s, no jump at the loop point
    face = media.still(media.astronaut(), SECONDS, fps=FPS)
    silence = np.zeros(int(SECONDS * RATE), np.float32)
    speech = fit(np.concatenate([media.speak(s) for s in SENTENCES]), SECONDS, lead_s=0.25)

    def build(name, frames, audio=None):
        return str(media.write_video(str(folder / f"{name}.mp4"), frames, FPS, audio=audio))

    first = media.speak(SENTENCES[0])
    paths = {
        "mouthing": build("mouthing", talk, silence),
        "voice_over": build("voice_over", face, speech),
        "silent": build("silent", face, silence),
        "no_audio": media.carphone_path(),
        "long_silence": build("long_silence", media.still(media.astronaut(), 9.5, fps=FPS),
                              fit(first, 9.5, lead_s=5.0)),
    }
    paths["corrupt_audio"] = media.garbage_audio_copy(paths["voice_over"], str(folder / "corrupt_audio.mp4"))
    items = {name: upstream(path) for name, path in paths.items()}
    for name, got in items.items():
        assert len(got) == 1 and not got[0].rejected, (name, got[0].reject if got else None)
    return {name: got[0] for name, got in items.items()}


@pytest.fixture(scope="session")
def speech_stage(whisper_dir):
    worker = StageWorker(SpeechDisambiguation({"asr_model_dir": str(whisper_dir)}))
    yield worker
    worker.close()


@pytest.fixture(scope="session")
def labelled(clips, speech_stage):
    """Every clip through the stage in one batch: one bad clip must not stop the others."""
    names = list(clips)
    out, stats = speech_stage.run([clips[n] for n in names])
    assert stats.items_in == len(names)
    return dict(zip(names, out))


def test_embedded_model_assembled_once(whisper_dir, tmp_path_factory):
    model = whisper_dir / "model.bin"
    assert model.stat().st_size > 100e6
    assert json.loads((whisper_dir / "vocabulary.json").read_text())[-1] == "<|30.00|>"
    before = model.stat().st_mtime_ns
    assert embedded_whisper_dir(whisper_dir.parent) == whisper_dir
    assert model.stat().st_mtime_ns == before  # found, not rebuilt
    assert [p.name for p in whisper_dir.parent.iterdir()] == [whisper_dir.name]  # no temp leftovers


def test_embedded_asr_wer(whisper_dir):
    asr = FasterWhisperASR(str(whisper_dir), compute_type="int8", threads=2)
    audio = media.speak(SENTENCES[0])
    result = asr.transcribe(audio, [(0.0, len(audio) / RATE)])
    assert wer(SENTENCES[0], result.text) <= 0.20, result.text
    assert result.language == "en"
    assert 0 < result.confidence <= 1
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and result.words[-1].end <= len(audio) / RATE + 0.05


def test_whisper_encodes_a_short_clip_once_with_the_same_result(whisper_dir, monkeypatch):
    """The language comes from the encoder output that is decoded: one encoder run where faster-whisper's own
    path (detect the language, then transcribe: the control) runs two, and the same words and language."""
    from faster_whisper import WhisperModel

    from lafid.speech.whisper import OneEncodeWhisper

    runs, encode = [], WhisperModel.encode
    monkeypatch.setattr(WhisperModel, "encode", lambda self, features: runs.append(1) or encode(self, features))
    asr = FasterWhisperASR(str(whisper_dir), threads=2)
    audio = media.speak(SENTENCES[1])
    once = asr.transcribe(audio, [(0.0, len(audio) / RATE)])
    assert len(runs) == 1 and once.language == "en" and once.words
    runs.clear()
    monkeypatch.setattr(OneEncodeWhisper, "first_window_language", lambda self, audio: None)  # faster-whisper's path
    own = asr.transcribe(audio, [(0.0, len(audio) / RATE)])
    assert len(runs) == 2
    assert (once.text, once.language, once.words) == (own.text, own.language, own.words)


@pytest.mark.parametrize("name", sorted(LABELS))
def test_labels(labelled, name):
    item = labelled[name]
    assert not item.rejected, item.reject
    assert item.columns["speaking_label"] == LABELS[name], {k: item.columns[k] for k in
                                                             ("lip_activity", "av_sync", "speech_ratio")}


def test_speech_columns_and_transcript(labelled):
    c = labelled["voice_over"].columns
    assert 0.8 < c["speech_ratio"] <= 1.0
    assert wer(" ".join(SENTENCES), c["transcript"]) <= 0.40, c["transcript"]  # through AAC
    assert c["language"] == "en" and c["words"]
    assert all(0 <= w["start"] <= w["end"] <= SECONDS + 0.05 for w in c["words"])
    assert c["transcript"][:20].lower() not in c["caption"].lower()  # not the visible person's words
    table = pa.Table.from_pylist([clip_row(labelled[n]) for n in LABELS], schema=CLIP_SCHEMA)  # shards accept every row
    assert table.num_rows == len(LABELS)


def test_long_silence_only_speech_reaches_asr(labelled):
    c = labelled["long_silence"].columns
    (start, end), = c["speech_segments"]
    assert 4.5 <= start <= 5.3 and end <= 9.5
    assert c["speech_ratio"] < 0.55
    # through AAC at 16 kHz Whisper-base slips a word or two more than on the clean
    # sentence (test_embedded_asr_wer holds the 20% bar)
    assert wer(SENTENCES[0], c["transcript"]) <= 0.40, c["transcript"]
    assert c["words"][0]["start"] >= start  # word times mapped back to the clip


def test_silent_clips_have_no_transcript(labelled):
    for name in ("silent", "mouthing", "no_audio"):
        c = labelled[name].columns
        assert c["speech_segments"] == [] and c["transcript"] == "" and c["av_sync"] is None


def test_corrupt_audio_rejected_with_reason(labelled):
    item = labelled["corrupt_audio"]
    assert item.rejected and item.reject.reason == "corrupt_audio"
    assert item.reject.stage == "speech_disambiguation"


def test_captions_agree_with_labels(labelled):
    transcript = labelled["voice_over"].columns["transcript"]
    assert transcript
    for name in LABELS:
        c = labelled[name].columns
        assert c["caption_source"] == "template"  # the template already agrees with the label
        assert "speaks to the camera" not in c["caption"]
        assert transcript.lower().rstrip(".")[:20] not in c["caption"].lower()
    assert "off-camera" in labelled["voice_over"].columns["caption"]


def test_source_caption_rewritten_on_voice_over(clips, speech_stage):
    item = dataclasses.replace(clips["voice_over"], columns=dict(clips["voice_over"].columns), reject=None)
    item.columns["caption"] = 'A woman in a spacesuit is talking to the camera, saying "the quick brown fox".'
    (out,), _ = speech_stage.run([item])
    c = out.columns
    assert c["speaking_label"] == "voice_over" and c["caption_source"] == "source+disambiguated"
    assert "talking" not in c["caption"] and "fox" not in c["caption"]
    assert c["caption"].startswith("A woman in a spacesuit is shown while someone off-camera speaks")


@pytest.mark.parametrize("label, expect, absent", [
    ("voice_over", "Two men are shown while someone off-camera speaks.", "chatting"),
    ("silent", "Two men are silent.", "chatting"),
    ("mouthing", "Two men are moving their lips without audible speech.", "chatting"),
    ("no_audio", "Two men are shown (the clip has no sound).", "chatting"),
    ("uncertain", "Two men are shown while speech can be heard.", "chatting"),
    ("speaking", 'Two men are chatting in a car. They say: "hi there"', None),
])
def test_disambiguate(label, expect, absent):
    got = disambiguate('Two men are chatting in a car. "hi there"', label, "hi there")
    assert got == expect
    assert absent is None or absent not in got
    if label != "speaking":
        assert disambiguate(got, label, "hi there") == got  # stable on a second pass
        assert "hi there" not in disambiguate(f"A man says hi there. {got}", label, "hi there")


def test_whisperx_fails_loudly_where_it_is_not_installed_and_is_never_imported_here():
    """The worker runs as a subprocess of the given python; this env has no whisperx."""
    asr = WhisperXASR(sys.executable, model="tiny", timeout_s=120)
    with pytest.raises(ASRError, match="whisperx"):
        asr.transcribe(media.speak("hello"), [(0.0, 0.5)])
    assert "whisperx" not in sys.modules


@pytest.mark.parametrize("params, message", [
    ({"asr_backend": "whisperx"}, "whisperx_python"),
    ({"asr_backend": "none", "captioner": "vlm"}, "vlm_model_dir"),
])
def test_optional_backends_need_their_config(params, message):
    with pytest.raises(ValueError, match=message):
        StageWorker(SpeechDisambiguation(params))
