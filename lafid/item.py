"""The unit of work that flows through every stage.

One `Item` is a whole source video until the shot-split stage fans it out into
one item per clip. Rejected items keep flowing (stages skip them) so the writer
sees every input exactly once and can prove nothing vanished.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Reject:
    """Why an item was dropped: `reason` is a stable code, `detail` is for humans."""

    stage: str
    reason: str
    detail: str = ""


@dataclass
class Item:
    source: str
    video_id: str
    # Filled by shot split; a video-level item has clip_index == -1.
    clip_index: int = -1
    clip_count: int = 1
    start_s: float = 0.0
    end_s: float = 0.0
    # Output columns, named as in `lafid.schema`; written to the shards.
    columns: dict[str, Any] = field(default_factory=dict)
    # Working data handed from one stage to the next (decoded faces, audio);
    # never written.
    work: dict[str, Any] = field(default_factory=dict)
    reject: Reject | None = None

    @property
    def rejected(self) -> bool:
        return self.reject is not None

    def drop(self, stage: str, reason: str, detail: str = "") -> "Item":
        """Mark the item rejected and free its working data."""
        self.reject = Reject(stage, reason, detail)
        self.work.clear()
        return self
