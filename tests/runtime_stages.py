"""Stages for the runtime tests: one hands a large array to the next through `Item.work`.

`register()` adds them to the stage registry and has cloudpickle ship this module
by value, so Ray workers (on any node) run them without importing the tests.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from pydantic import Field

from lafid.item import Item
from lafid.stage import Resources, Stage, StageParams

import stage_registry


def fill_value(item: Item) -> int:
    """A byte that depends only on the clip (its time range), so every run computes the same."""
    return int(round(item.start_s * 1000 + item.end_s * 10)) % 251


class CarryParams(StageParams):
    megabytes: float = Field(1.0, description="size of the array handed to the next stage")


class Carry(Stage):
    """Attaches an array filled with a byte derived from the clip, as a face stage attaches crops."""

    name = "carry"
    Params = CarryParams
    default_resources = Resources(cpus=0.25)
    writes_work = ("blob",)

    def process_item(self, item: Item) -> list[Item]:
        if item.clip_index >= 0:
            item.work["blob"] = np.full(int(self.params.megabytes * 2**20), fill_value(item), dtype=np.uint8)
        return [item]


class WeighParams(StageParams):
    delay_s: float = Field(0.0, description="seconds of pretend work per clip")
    pid_dir: str = Field("", description="each worker writes a file named by its pid here at setup")


class Weigh(Stage):
    """Reads the array the previous stage attached and writes what it holds into the row."""

    name = "weigh"
    Params = WeighParams
    default_resources = Resources(cpus=0.25)
    reads_work = ("blob",)
    writes = ("face_ratio", "face_area_median")

    def setup(self) -> None:
        if self.params.pid_dir:
            open(os.path.join(self.params.pid_dir, str(os.getpid())), "w").close()

    def process_item(self, item: Item) -> list[Item]:
        time.sleep(self.params.delay_s)
        blob = item.work["blob"]
        item.columns["face_ratio"] = float(blob.mean()) / 255  # the byte the carry stage wrote
        item.columns["face_area_median"] = float(blob.size)
        return [item]


STAGES = (Carry, Weigh)


def register() -> None:
    stage_registry.register(sys.modules[__name__])


def unregister() -> None:
    stage_registry.unregister(sys.modules[__name__])
