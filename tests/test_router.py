"""The router on hand-made items: where each goes, when a video is complete, and how
a stage that loses or invents clips is caught."""

import copy

import pytest

from lafid.item import Item
from lafid.progress import RunStats
from lafid.router import Router, RunFailed
from lafid.shards import ShardWriter


class Writer(ShardWriter):
    def __init__(self):
        self.videos = []

    def add_video(self, items):
        self.videos.append([(i.clip_index, i.reject.reason if i.reject else "kept") for i in items])


def clips(video, n, indices=None):
    return [Item(source="v.mp4", video_id=video, clip_index=i, clip_count=n) for i in (indices or range(n))]


@pytest.fixture
def router():
    return Router(["split", "filter"], Writer(), RunStats())


def test_a_video_completes_when_every_clip_index_is_written(router):
    (video,) = router.admit(Item(source="v.mp4", video_id="v"))
    three = clips("v", 3)
    three[1].drop("split", "too_short")
    onward = router.done(0, [video], three)
    assert [i.clip_index for i in onward] == [0, 2] and router.writer.videos == []
    assert router.done(1, onward[1:], onward[1:]) == [] and router.writer.videos == []
    router.done(1, onward[:1], onward[:1])
    assert router.writer.videos == [[(0, "kept"), (1, "too_short"), (2, "kept")]]
    router.finish()


def test_lost_doubled_and_invented_clips_become_one_stage_error_each(router):
    (video,) = router.admit(Item(source="v.mp4", video_id="v"))
    fan = clips("v", 4, [0, 1, 1, 3, 7])  # clip 2 missing, clip 1 twice, clip 7 invented
    onward = router.done(0, [video], fan)
    assert [i.clip_index for i in onward] == [0, 3] and router.discarded == 1
    out = router.done(1, onward, [onward[0], onward[0], copy.deepcopy(onward[0])])  # clip 3 lost, 0 tripled
    assert out == []
    (written,) = router.writer.videos
    assert written == [(0, "stage_error"), (1, "stage_error"), (2, "stage_error"), (3, "stage_error")]
    assert router.stats.reasons == {"split/stage_error": 2, "filter/stage_error": 2}


def test_a_whole_video_dropped_by_a_stage_is_written_as_a_reject(router):
    (video,) = router.admit(Item(source="v.mp4", video_id="v"))
    assert router.done(0, [video], []) == []
    assert router.writer.videos == [[(-1, "stage_error")]]
    assert video.reject.detail == "returned no item for this video"


def test_finish_fails_loudly_when_a_video_is_unaccounted_for(router):
    router.admit(Item(source="v.mp4", video_id="v"))
    with pytest.raises(RunFailed, match="1 of 1 videos were not accounted for"):
        router.finish()
    with pytest.raises(RunFailed, match="admitted twice"):
        router.admit(Item(source="v.mp4", video_id="v"))
