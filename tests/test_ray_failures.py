"""A worker process that dies mid-batch costs only its batch: reject rows, and the run goes on."""

import os
import sys

import pytest
from ray import cloudpickle

from lafid import registry
from lafid.item import Item
from lafid.recipe import Recipe
from lafid.report import read_table
from lafid.runner import curate
from lafid.stage import Resources, Stage


class CrashOnName(Stage):
    """Kills its own process on a source named *crash*, as a segfaulting decoder would."""

    name = "crash_on_name"
    default_resources = Resources(cpus=0.25)

    def process_item(self, item: Item) -> list[Item]:
        if "crash" in os.path.basename(item.source):
            os._exit(1)
        return [item]


@pytest.fixture
def crash_stage(monkeypatch):
    monkeypatch.setitem(registry.STAGES, CrashOnName.name, f"{__name__}:CrashOnName")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import the tests
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.mark.ray
def test_dead_worker_turns_its_batch_into_rejects(ray_cluster, crash_stage, make_video, carphone, tmp_path):
    good = make_video("carphone", lambda: carphone, 29.97)
    crash = make_video("crash", lambda: carphone[:60], 29.97)
    recipe = Recipe(name="crash", stages=[{"stage": "shot_split", "cpus": 0.25, "params": {"min_clip_s": 0.5}},
                                          {"stage": "crash_on_name", "cpus": 0.25}])
    stats = curate(recipe, [good, crash], tmp_path, executor="ray")
    assert stats.videos_done == 2 and stats.kept == 1
    (reject,) = read_table(tmp_path, "rejects").to_pylist()
    assert reject["source"] == crash and reject["stage"] == "crash_on_name"
    assert reject["reason"] == "worker_crashed"
    assert read_table(tmp_path).column("source").to_pylist() == [good]
