"""Where every item goes, for both executors.

The executors only schedule: they hand the router each batch a stage was given
and the items it returned, and the router decides what happens next. A rejected
item, or one that passed the last stage, goes to the writer; any other goes to
the next stage. The router also holds each video until every one of its clips
has reached the writer, tracked as a set of clip indices, so a video is recorded
done exactly when all its rows exist.

Stages are checked, not trusted: a clip a stage dropped (returned no item for)
becomes a `stage_error` reject, a clip it returned twice becomes one
`stage_error` reject (never two rows), and items for clips it was not given are
discarded. At the end `finish()` proves every admitted video was written, and
fails the run loudly otherwise.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable

from lafid.item import Item
from lafid.progress import RunStats
from lafid.shards import ShardWriter

log = logging.getLogger("lafid.run")

VIDEO = -1  # clip index of a whole-video item


class RunFailed(RuntimeError):
    """The run cannot go on for a reason that is not the media's (nothing false is recorded)."""


class SetupFailed(RunFailed):
    """A stage could not set up (models, files): the run stops before any work."""


def setup_failed(stage: str, exc: BaseException | str) -> SetupFailed:
    why = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return SetupFailed(f"stage {stage!r} failed to set up: {why}")


@dataclass
class _Video:
    pending: set[int] = field(default_factory=lambda: {VIDEO})  # clip indices still in a stage
    done: dict[int, Item] = field(default_factory=dict)  # clip index -> item at the writer


class Router:
    def __init__(self, steps: list[str], writer: ShardWriter, stats: RunStats,
                 on_update: Callable[[RunStats], None] | None = None):
        # What the executor hands batches to, in order: the recipe's stages, or one step that runs them all
        # (the Ray runner's `pools: chain`, which sets it).
        self.steps = steps
        self.writer = writer
        self.stats = stats
        self.on_update = on_update
        self._videos: dict[str, _Video] = {}
        self.admitted = 0
        self.completed = 0
        self.discarded = 0  # items stages returned for clips they were not given
        self.checkpoint: Callable[[], None] | None = None  # called between batches: may stop the run (Ctrl-C)

    @property
    def open_videos(self) -> int:
        return len(self._videos)

    def admit(self, item: Item) -> list[Item]:
        """A new video from the source; returns what goes to the first stage."""
        if self.checkpoint:
            self.checkpoint()
        if item.video_id in self._videos:
            raise RunFailed(f"video {item.video_id} ({item.source}) admitted twice")
        self._videos[item.video_id] = _Video()
        self.admitted += 1
        return self._send([item], 0)

    def done(self, step: int, given: list[Item], returned: list[Item]) -> list[Item]:
        """Step `step` was given `given` and returned `returned`; returns what goes to step + 1."""
        if self.checkpoint:
            self.checkpoint()
        name = self.steps[step]
        by_key: dict[tuple[str, int], list[Item]] = defaultdict(list)
        for item in returned:
            by_key[(item.video_id, item.clip_index)].append(item)
        accepted: list[Item] = []
        for item in given:
            video = self._videos.get(item.video_id)
            if video is None or item.clip_index not in video.pending:
                raise RunFailed(f"stage {name!r} was given clip {item.clip_index} of {item.video_id}, "
                                "which is not in flight")
            if item.clip_index == VIDEO:
                accepted.extend(self._video_result(name, item, video, by_key))
            else:
                got = [i for i in by_key.pop((item.video_id, item.clip_index), []) if i.clip_count == item.clip_count]
                accepted.append(got[0] if len(got) == 1 else _error(item, name, _count(len(got), "clip")))
        strays = sum(len(v) for v in by_key.values())
        if strays:
            self.discarded += strays
            log.warning("stage %s returned %d item(s) for clips it was not given; discarded", name, strays)
        return self._send(accepted, step + 1)

    def _video_result(self, name: str, item: Item, video: _Video,
                      by_key: dict[tuple[str, int], list[Item]]) -> list[Item]:
        """A whole video was given: one whole-video item back, or a full fan-out into clips 0..n-1."""
        whole = by_key.pop((item.video_id, VIDEO), [])
        clips = {k: by_key.pop(k) for k in [k for k in by_key if k[0] == item.video_id]}
        if not clips:
            return [whole[0] if len(whole) == 1 else _error(item, name, _count(len(whole), "video"))]
        if whole:
            return [_error(item, name, f"returned the whole video and {sum(map(len, clips.values()))} clips")]
        n = max(i.clip_count for items in clips.values() for i in items)
        video.pending = set(range(n))
        out = []
        for index in range(n):
            got = [i for i in clips.pop((item.video_id, index), []) if i.clip_count == n]
            if len(got) == 1:
                out.append(got[0])
            else:
                clip = got[0] if got else Item(source=item.source, video_id=item.video_id, clip_index=index,
                                               clip_count=n)
                out.append(_error(clip, name, _count(len(got), f"clip {index} of {n}")))
        if clips:
            self.discarded += sum(map(len, clips.values()))
            log.warning("stage %s returned clips outside 0..%d for %s; discarded", name, n - 1, item.video_id)
        return out

    def is_open(self, video_id: str) -> bool:
        return video_id in self._videos

    def restart(self, video_id: str, source: str) -> list[Item]:
        """Forget what is known of an open video (its working data was lost with a node) and send it
        to the first stage again; its clips already at the writer are taken back from the counts."""
        for item in self._videos.pop(video_id).done.values():
            if item.rejected:
                self.stats.rejected -= 1
                self.stats.reasons[f"{item.reject.stage}/{item.reject.reason}"] -= 1
                self.stats.reasons += Counter()  # drops reasons counted down to zero
            else:
                self.stats.kept -= 1
        self._videos[video_id] = _Video()
        return self._send([Item(source=source, video_id=video_id)], 0)

    def _send(self, items: list[Item], step: int) -> list[Item]:
        onward = []
        for item in items:
            if item.rejected or step >= len(self.steps):
                self._deliver(item)
            else:
                onward.append(item)
        return onward

    def _deliver(self, item: Item) -> None:
        video = self._videos[item.video_id]
        video.pending.remove(item.clip_index)
        video.done[item.clip_index] = item
        self.stats.finished(item)
        if not video.pending:
            del self._videos[item.video_id]
            self.writer.add_video([video.done[i] for i in sorted(video.done)])
            self.completed += 1
            self.stats.videos_done += 1
        if self.on_update:
            self.on_update(self.stats)

    def finish(self) -> None:
        """Every admitted video must have been written; anything else is a bug that must not pass."""
        if self._videos or self.completed != self.admitted:
            stuck = ", ".join(f"{v} (clips {sorted(s.pending)} unfinished)" for v, s in list(self._videos.items())[:5])
            raise RunFailed(f"{self.admitted - self.completed} of {self.admitted} videos were not accounted for: "
                            f"{stuck}; their rows were not written, rerun to redo them")


def _count(n: int, what: str) -> str:
    return f"returned no item for this {what}" if n == 0 else f"returned {n} items for this {what}"


def _error(item: Item, stage: str, detail: str) -> Item:
    return item.drop(stage, "stage_error", detail)
