"""Captions that agree with who is speaking.

A `Captioner` writes a caption from a clip's facts (and frames, for a VLM).
`disambiguate` then makes any caption, whoever wrote it, agree with the
speaking label: claims that the visible person talks are rewritten unless the
label is `speaking`, quoted speech is removed, and the transcript is added
only when the visible person is the one speaking. A caption that says
"a man is talking" over an off-screen voice would teach a video model to move
lips at random.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LABELS = ("speaking", "voice_over", "uncertain", "silent", "mouthing", "no_audio")

# What the visible person does, per label; spliced in where a caption claimed speech.
_ACTION = {
    "voice_over": "is shown while someone off-camera speaks",
    "uncertain": "is shown while speech can be heard",  # claims neither an on-screen nor an off-camera speaker
    "silent": "is silent",
    "mouthing": "is moving their lips without audible speech",
    "no_audio": "is shown (the clip has no sound)",
}
_SPEECH_VERB = (r"talk(?:s|ing|ed)?|speak(?:s|ing)?|spoke|chat(?:s|ting|ted)?|say(?:s|ing)?|said|"
                r"tell(?:s|ing)?|told|explain(?:s|ing|ed)?|narrat(?:es|ing|ed)|convers(?:es|ing|ed)|"
                r"discuss(?:es|ing|ed)?|lectur(?:es|ing|ed)|address(?:es|ing|ed)")
# "is talking to the camera about X", "says hello", "speaks": up to the clause's end.
_CLAIM = re.compile(rf"\b(?:(?P<aux>is|are|was|were)\s+)?(?:\w+ly\s+)?(?P<verb>{_SPEECH_VERB})\b[^.;!?\n]*", re.I)
_SINGULAR_FORMS = ("s", "ing", "ed", "spoke", "said", "told")
_QUOTE = re.compile(r"\s*[:,]?\s*[\"“”'‘’][^\"“”]{2,}?[\"“”]")


@dataclass
class ClipFacts:
    """What the stage knows about a clip; the template captioner uses only these."""

    label: str
    pose_buckets: list[str] = field(default_factory=list)
    yaw_min: float | None = None
    yaw_max: float | None = None


class Captioner(ABC):
    name = "captioner"
    needs_frames = False

    @abstractmethod
    def caption(self, facts: ClipFacts, frames: list[np.ndarray] | None = None) -> str:
        """A caption for the clip; `disambiguate` is applied afterwards by the stage."""


STILL_HEAD_YAW = 5.0  # a yaw range below this (degrees) is described as a still head


class TemplateCaptioner(Captioner):
    """Deterministic caption from the clip's own facts: pose range and speaking label."""

    name = "template"

    def caption(self, facts: ClipFacts, frames=None) -> str:
        pose = ""
        if facts.pose_buckets:
            views = " and ".join(b if b in ("frontal", "extreme") else f"{b}-facing" for b in facts.pose_buckets)
            pose = f" seen in {views} views"
        if facts.yaw_min is not None and facts.yaw_max is not None:
            if facts.yaw_max - facts.yaw_min < STILL_HEAD_YAW:
                pose += ", head held still"
            else:
                pose += f", head turning between {facts.yaw_min:+.0f} and {facts.yaw_max:+.0f} degrees of yaw"
        action = "speaks to the camera" if facts.label == "speaking" else _ACTION[facts.label]
        return f"A person{pose}. The person {action}."


class VLMCaptioner(Captioner):
    """A vision-language model from a local directory (transformers image-text-to-text).

    Loaded lazily from `model_dir` only: nothing is downloaded. It sees a few
    frames of the clip; its speech claims are corrected by `disambiguate`.
    """

    name = "vlm"
    needs_frames = True
    PROMPT = "Describe the person in this video clip in one or two sentences: appearance, setting and head movement."

    def __init__(self, model_dir: str, max_new_tokens: int = 60, device: str = "cpu"):
        if not Path(model_dir).is_dir():
            raise FileNotFoundError(f"VLM model directory not found: {model_dir}")
        from transformers import pipeline

        self.pipe = pipeline("image-text-to-text", model=model_dir, device=device)
        self.max_new_tokens = max_new_tokens

    def caption(self, facts: ClipFacts, frames=None) -> str:
        from PIL import Image

        content = [{"type": "image", "image": Image.fromarray(f)} for f in frames or []]
        content.append({"type": "text", "text": self.PROMPT})
        out = self.pipe(text=[{"role": "user", "content": content}], max_new_tokens=self.max_new_tokens,
                        return_full_text=False)
        return out[0]["generated_text"].strip()


def disambiguate(caption: str, label: str, transcript: str = "") -> str:
    """Rewrite `caption` so its speech claims agree with `label`."""
    if label not in LABELS:
        raise ValueError(f"unknown speaking label {label!r}")
    text = _QUOTE.sub("", caption)
    transcript = " ".join(transcript.split())
    if transcript:  # a captioner may have echoed the transcript without quotes
        text = re.sub(rf"\b{re.escape(transcript)}\b", "", text, flags=re.I)
    if label == "speaking":
        if not _CLAIM.search(text):
            text = text.rstrip(" .") + ". The person speaks to the camera."
        if transcript:
            text = text.rstrip(" .") + f'. They say: "{transcript}"'
        return _tidy(text)
    action = _ACTION[label]

    plural = action.replace("is ", "are ", 1)

    def rewrite(match: re.Match) -> str:
        """Keep the claim's grammatical number: "are talking" and "chat" take "are"."""
        aux, verb = (match.group("aux") or "").lower(), match.group("verb").lower()
        many = aux in ("are", "were") or (not aux and not verb.endswith(_SINGULAR_FORMS))
        return plural if many else action

    # Our own action phrases ("someone off-camera speaks") are kept, so a second pass changes nothing.
    parts = re.split(f"({re.escape(action)}|{re.escape(plural)})", text)
    rewritten = "".join(p if i % 2 else _CLAIM.sub(rewrite, p) for i, p in enumerate(parts))
    if action not in rewritten and plural not in rewritten:
        rewritten = rewritten.rstrip(" .") + f". The person {action}."
    return _tidy(rewritten)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+([.,;!?])", r"\1", " ".join(text.split()))
    text = re.sub(r"([.;!?])\1+", r"\1", text)
    return text if text.endswith((".", "!", "?", '"')) else text + "."
