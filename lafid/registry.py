"""Stage names usable in recipes, mapped to their classes (imported on demand)."""

from __future__ import annotations

import importlib

from lafid.stage import Stage

STAGES: dict[str, str] = {
    "shot_split": "lafid.stages.shot_split:ShotSplit",
    "face_constraints": "lafid.stages.face_constraints:FaceConstraints",
    "identity_consistency": "lafid.stages.identity_consistency:IdentityConsistency",
    "speech_disambiguation": "lafid.stages.speech_disambiguation:SpeechDisambiguation",
    "clip_quality": "lafid.stages.clip_quality:ClipQuality",
}


def stage_class(name: str) -> type[Stage]:
    try:
        target = STAGES[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}") from None
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)
