"""faster-whisper's `WhisperModel`, encoding each clip's first window once.

Without a given language, faster-whisper 1.2's `transcribe` encodes the first
30 s window to detect the language and then encodes it again to decode it (its
`generate_segments` is handed no encoder output). The encoder runs on a full
30 s window however short the speech, so for short clips it is most of the ASR
cost. `first_window_language` encodes that window exactly as `generate_segments`
will cut it, detects the language from this output and keeps it; the next
`encode` of an equal window returns it instead of running the encoder again.
Imported by `FasterWhisperASR` only, so importing `lafid.speech.asr` stays cheap.
"""

from __future__ import annotations

import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim


class OneEncodeWhisper(WhisperModel):
    _primed: tuple[np.ndarray, object] | None = None  # (window, encoder output) for the next `encode`

    def first_window_language(self, audio: np.ndarray) -> str:
        """The language of the first 30 s of 16 kHz `audio`, from the encoding `transcribe` then reuses."""
        if not self.model.is_multilingual:
            return "en"
        features = self.feature_extractor(audio)  # as `transcribe` computes them
        content = features.shape[-1] - 1  # the last frame is padding, as `generate_segments` counts
        window = pad_or_trim(features[:, : min(self.feature_extractor.nb_max_frames, content)])
        output = super().encode(window)
        self._primed = (window, output)
        return self.model.detect_language(output)[0][0][0][2:-2]  # '<|en|>' -> 'en'

    def encode(self, features: np.ndarray):
        primed, self._primed = self._primed, None
        if primed is not None and primed[0].shape == features.shape and np.array_equal(primed[0], features):
            return primed[1]
        return super().encode(features)
