"""Speech Disambiguation: is there speech, and is the visible person the speaker?

Per clip: the audio is extracted once (16 kHz mono), Silero VAD finds speech,
only the speech goes to ASR (word timestamps, language, confidence). Lip
activity comes from the mouth openings Face Constraints measured for pose; for
the sync decision the mouth is measured again at the video's own frame rate,
inside the speech and `mouth_margin_s` around it, on the subject track's box
(`lafid.speech.mouth`), and compared with the voice's articulation envelope
(`lafid.speech.sync`). With `lip_detector: vvad` a learned lip model
(`lafid.speech.vvad`) decides from the same pass whether the lips talk during
speech, instead of lip activity.
Label (`decide`, a pure function of the clip's columns and the thresholds below):
- `no_audio`   the file has no audio stream
- `silent`     no speech, lips still
- `mouthing`   no speech, lips move
- `speaking`   speech, and the lips are in step with it: the sync score clears the
               null distribution's operating point with its best lag strictly inside
               +-max_lag_s (a best lag at the window's edge is no peak), and they
               are not still (still lips in step with a voice: `uncertain`)
- `voice_over` speech, and positive evidence that the visible face is not the voice:
               the lips are still (or, with vvad, not talking) while it is heard, or
               they move out of step with it, with one clear peak at a clear lag away
               from 0; either way without in-step evidence
- `uncertain`  anything else: missing or weak evidence is never the opposite label;
               the caption claims neither an on-screen nor an off-camera speaker
The thresholds come from a measured null distribution (the clip's own voice
shifted by >= 1 s and other speakers' voices) and the spread of each score under
re-encoding: benchmarks/speech_labels.py prints both and the operating point.
The caption (the clip's own `caption` column if an upstream source set one,
else the configured captioner's) is then rewritten to agree with the label.
Corrupt audio rejects the clip (`corrupt_audio`); nothing else here rejects.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from lafid.item import Item
from lafid.speech.asr import ASRBackend, FasterWhisperASR, Transcript, WhisperXASR
from lafid.speech.audio import AudioError, extract_audio
from lafid.speech.captions import Captioner, ClipFacts, TemplateCaptioner, VLMCaptioner, disambiguate
from lafid.schema import SPEECH, names
from lafid.speech.lip import lip_activity, lip_series
from lafid.speech.mouth import MouthTracker
from lafid.speech.sync import LAG_STEP_S, av_sync
from lafid.speech.vvad import LipSpeakingModel
from lafid.speech.vad import SileroVAD, around, within
from lafid.stage import Resources, Stage, StageParams
from lafid.video import sample_frames


class SpeechDisambiguationParams(StageParams):
    vad_threshold: float = Field(0.5, gt=0, lt=1, description="Silero speech probability that starts speech")
    vad_min_speech_s: float = Field(0.25, ge=0, description="shorter speech bursts are ignored")
    vad_min_silence_s: float = Field(0.3, ge=0, description="shorter pauses do not end a segment")
    vad_pad_s: float = Field(0.3, ge=0, description="padding on each side of a speech segment (Whisper needs onset context)")
    min_speech_s: float = Field(0.5, ge=0, description="less speech than this in a clip counts as no speech")
    min_lip_activity: float = Field(0.1, ge=0, description="without speech: mouth-opening change per second "
                                    "above which lips move (`mouthing`)")
    max_still_lips: float = Field(0.09, ge=0, description="during speech: lip activity below which the lips are "
                                  "still (evidence of `voice_over`)")
    min_sync_score: float = Field(2.6, description="sync z-score at or above which the lips are in step (`speaking`)")
    max_unsynced_score: float = Field(1.7, description="sync z-score below which there is no in-step evidence "
                                      "(an out-of-step peak needs it to give `voice_over`)")
    min_offset_score: float = Field(4.3, description="peak z-score of one clear out-of-step offset (`voice_over`)")
    min_offset_s: float = Field(0.5, gt=0, le=2.5, description="an out-of-step peak lies at least this far from 0")
    max_lag_s: float = Field(0.2, ge=0, le=0.5, description="audio-video offset searched for the in-step peak")
    min_sync_speech_s: float = Field(3.0, ge=0, description="less speech than this: lip/voice sync is no evidence "
                                     "either way (its chance peaks grow as clips shorten)")
    min_sync_frames: int = Field(25, ge=5, description="mouth frames inside speech needed to measure sync")
    mouth_min_fps: float = Field(25.0, gt=0, description="mouth pass rate: the video's own fps, at least this")
    mouth_margin_s: float = Field(1.0, ge=0, le=3.0, description="the mouth pass reaches this far around speech, so "
                                  "a voice this late or early still meets the lips that made it (out-of-step peak)")
    lip_detector: Literal["mesh", "vvad"] = Field(
        "mesh", description="who says the lips talk during speech: mesh = lip activity; vvad = the learned "
        "VVAD-LRS3 lip model (pip install --no-deps vvadlrs3==0.2.0 h5py; LGPL, non-commercial landmark data)")
    min_visual_speaking: float = Field(0.5, ge=0, le=1, description="vvad: speaking probability for talking lips")
    max_bad_audio_ratio: float = Field(0.1, ge=0, le=1, description="more failed audio packets = corrupt_audio")

    asr_backend: Literal["faster_whisper", "whisperx", "none"] = "faster_whisper"
    asr_model_dir: str | None = Field(None, description="CTranslate2 Whisper dir; None = embedded Whisper-base")
    asr_compute_type: str = Field("int8", description="CTranslate2 compute type (int8, float32, float16 on GPU)")
    device: str = Field("cpu", description="device for ASR and the VLM captioner (cpu, cuda)")
    asr_beam_size: int = Field(5, ge=1)
    asr_language: str | None = Field(None, description="force a language code; None = detect")
    whisperx_python: str | None = Field(None, description="python of whisperx's own environment")
    whisperx_model: str = Field("large-v3", description="whisperx model name or local directory")
    captioner: Literal["template", "vlm"] = "template"
    vlm_model_dir: str | None = Field(None, description="local transformers image-text-to-text model dir")
    vlm_frames: int = Field(4, ge=1, description="frames shown to the VLM captioner")

    @model_validator(mode="after")
    def _scores_ordered(self):
        if self.max_unsynced_score > self.min_sync_score:
            raise ValueError("max_unsynced_score must not exceed min_sync_score")
        if self.min_offset_s <= self.max_lag_s:
            raise ValueError("min_offset_s must exceed max_lag_s (an out-of-step peak lies outside the in-step window)")
        return self


def decide(c: dict, p: SpeechDisambiguationParams) -> str:
    """The speaking label from a clip's measured columns (no `no_audio` here: that is
    the absence of a stream, not a measurement)."""
    lips = c.get("lip_activity")
    speech_s = sum(e - s for s, e in c.get("speech_segments") or [])
    if speech_s < p.min_speech_s:
        return "mouthing" if lips is not None and lips >= p.min_lip_activity else "silent"
    score, lag = (c.get("av_sync"), c.get("av_lag_s")) if speech_s >= p.min_sync_speech_s else (None, None)
    if p.lip_detector == "vvad":
        still = c.get("visual_speaking") is not None and c["visual_speaking"] < p.min_visual_speaking
    else:
        still = lips is not None and lips < p.max_still_lips
    if score is not None and score >= p.min_sync_score and abs(lag) < p.max_lag_s - LAG_STEP_S / 2:
        return "uncertain" if still else "speaking"  # still lips in step with the voice: the evidence disagrees
    if still:
        return "voice_over"
    peak, peak_lag = c.get("av_peak_z"), c.get("av_peak_lag_s")
    out_of_step = (score is not None and score < p.max_unsynced_score  # no in-step evidence, re-encoding spread kept
                   and peak is not None and peak >= p.min_offset_score and abs(peak_lag) >= p.min_offset_s)
    return "voice_over" if out_of_step else "uncertain"


class SpeechDisambiguation(Stage):
    name = "speech_disambiguation"
    Params = SpeechDisambiguationParams
    default_resources = Resources(cpus=1)
    reads = ("fps", "frame_t", "frame_box", "frame_mouth_open")
    writes = names(SPEECH)
    # Nothing here rejects by a threshold (corrupt_audio is a failed measurement); the label and caption
    # follow from the thresholds (`derive`), so `lafid filter` re-labels and re-captions.
    THRESHOLDS = frozenset({"min_lip_activity", "max_still_lips", "min_sync_score", "max_unsynced_score",
                            "min_offset_score", "min_offset_s", "min_sync_speech_s", "min_visual_speaking"})
    MEASURE_PARAMS = frozenset({"vad_threshold", "vad_min_speech_s", "vad_min_silence_s", "vad_pad_s",
                                "min_speech_s", "max_lag_s", "min_sync_frames", "mouth_min_fps", "mouth_margin_s",
                                "lip_detector", "max_bad_audio_ratio", "asr_backend", "asr_model_dir",
                                "asr_compute_type", "device", "asr_beam_size", "asr_language", "whisperx_python",
                                "whisperx_model", "captioner", "vlm_model_dir", "vlm_frames"})
    DECIDES_ON = ("lip_activity", "speech_segments", "av_sync", "av_lag_s", "av_peak_z", "av_peak_lag_s",
                  "visual_speaking", "speaking_label", "caption", "caption_source", "transcript", "pose_buckets",
                  "yaw_min", "yaw_max")

    def setup(self) -> None:
        p: SpeechDisambiguationParams = self.params
        threads = self.resources.threads
        self.mouth = MouthTracker()
        self.lip_model = LipSpeakingModel() if p.lip_detector == "vvad" else None
        self.vad = SileroVAD(threads, p.vad_threshold, p.vad_min_speech_s, p.vad_min_silence_s, p.vad_pad_s)
        self.asr = self._asr(p, threads)
        self.captioner = self._captioner(p)

    @staticmethod
    def _asr(p: SpeechDisambiguationParams, threads: int) -> ASRBackend | None:
        if p.asr_backend == "faster_whisper":
            return FasterWhisperASR(p.asr_model_dir, p.asr_compute_type, threads, p.asr_beam_size,
                                    p.asr_language, p.device)
        if p.asr_backend == "whisperx":
            if not p.whisperx_python:
                raise ValueError("asr_backend 'whisperx' needs whisperx_python (its own environment)")
            return WhisperXASR(p.whisperx_python, p.whisperx_model, p.device, p.asr_compute_type,
                               p.asr_language, threads=threads)
        return None

    @staticmethod
    def _captioner(p: SpeechDisambiguationParams) -> Captioner:
        if p.captioner == "vlm":
            if not p.vlm_model_dir:
                raise ValueError("captioner 'vlm' needs vlm_model_dir")
            return VLMCaptioner(p.vlm_model_dir, device=p.device)
        return TemplateCaptioner()

    def teardown(self) -> None:
        if self.asr is not None:
            self.asr.close()

    def process_item(self, item: Item) -> list[Item]:
        p: SpeechDisambiguationParams = self.params
        try:
            audio = extract_audio(item.source, item.start_s, item.end_s, p.max_bad_audio_ratio)
        except AudioError as exc:
            return [item.drop(self.name, exc.reason, exc.detail)]
        t, mouth = lip_series(item.columns.get("frame_t"), item.columns.get("frame_mouth_open"))
        cols: dict = {"lip_activity": lip_activity(t, mouth), "speech_segments": [], "speech_ratio": 0.0,
                      "av_sync": None, "av_lag_s": None, "av_peak_z": None, "av_peak_lag_s": None,
                      "visual_speaking": None, **Transcript().as_columns()}
        if audio is None:
            cols["speaking_label"] = "no_audio"  # measured: no stream (derive keeps it)
        else:
            segments = self.vad.segments(audio.samples)
            speech_s = sum(e - s for s, e in segments)
            cols["speech_segments"] = [[s, e] for s, e in segments]
            cols["speech_ratio"] = speech_s / audio.duration_s if audio.duration_s else 0.0
            if speech_s >= p.min_speech_s:
                cols.update(self._sync_columns(item, segments, audio.samples))
                if self.asr is not None:
                    cols.update(self.asr.transcribe(audio.samples, segments).as_columns())
        item.columns.update(cols)
        self._first_caption(item)
        return self.conclude(item)

    def derive(self, c: dict) -> dict:
        """The label (`decide`) and the caption made to agree with it: a template caption is written again
        from the clip's facts; a source or VLM caption (kept as written, see `_first_caption`) is rewritten."""
        label = self._label(c)
        source = (c.get("caption_source") or TemplateCaptioner.name).split("+")[0]
        original = TemplateCaptioner().caption(_facts(c, label)) if source == TemplateCaptioner.name else c["caption"]
        caption = disambiguate(original, label, c.get("transcript") or "")
        return {"speaking_label": label, "caption": caption,
                "caption_source": source if caption == original else f"{source}+disambiguated"}

    def _label(self, c: dict) -> str:
        """`no_audio` is measured (no stream); every other label is decided from the columns."""
        return "no_audio" if c.get("speaking_label") == "no_audio" else decide(c, self.params)

    def _first_caption(self, item: Item) -> None:
        """An upstream caption (`source`) or the VLM's, before `derive` makes it agree with the label."""
        c = item.columns
        if c.get("caption"):
            c["caption_source"] = "source"
        elif self.captioner.name != TemplateCaptioner.name:
            label = self._label(c)
            frames = self._frames(item) if self.captioner.needs_frames else None
            c["caption"], c["caption_source"] = self.captioner.caption(_facts(c, label), frames), self.captioner.name
        else:
            c["caption_source"] = TemplateCaptioner.name

    def _mouth(self, item: Item, segments: list[tuple[float, float]]):
        """The subject's mouth at the source frame rate inside speech and `mouth_margin_s` around it."""
        c, p = item.columns, self.params
        fps = max(float(c.get("fps") or 0.0), p.mouth_min_fps)
        windows = around(segments, p.mouth_margin_s, item.end_s - item.start_s)
        return self.mouth.series(item.source, item.start_s, windows, c.get("frame_t"), c.get("frame_box"), fps)

    def _sync_columns(self, item: Item, segments: list[tuple[float, float]], samples: np.ndarray) -> dict:
        """Lip/voice sync (and the learned lip model's verdict) from one mouth pass inside speech."""
        p: SpeechDisambiguationParams = self.params
        series = self._mouth(item, segments)
        cols: dict = {}
        if self.lip_model is not None:  # do the lips talk while the voice is heard
            heard = within(series.t, segments)
            lips = [x for x, h in zip(series.lips, heard) if h]
            cols["visual_speaking"] = self.lip_model.speaking(series.t[heard], lips)
        sync = av_sync(series.t, series.lip_height, samples, p.max_lag_s, min_frames=p.min_sync_frames)
        if sync is not None:
            cols.update(av_sync=sync.score, av_lag_s=sync.lag_s, av_peak_z=sync.peak_score,
                        av_peak_lag_s=sync.peak_lag_s)
        return cols

    def _frames(self, item: Item) -> list[np.ndarray]:
        """A few frames spread over the clip, for captioners that look."""
        n = self.params.vlm_frames
        fps = n / max(item.end_s - item.start_s, 1e-3)
        return [f for _, f in sample_frames(item.source, item.start_s, item.end_s, fps, max_side=448)][:n]


def _facts(c: dict, label: str) -> ClipFacts:
    return ClipFacts(label=label, pose_buckets=list(c.get("pose_buckets") or []), yaw_min=c.get("yaw_min"),
                     yaw_max=c.get("yaw_max"))
