"""Stages that misbehave on purpose, for the failure tests.

`register()` adds them to the stage registry and has cloudpickle ship this module
by value, so Ray workers run them without importing the tests.
"""

from __future__ import annotations

import copy
import os
import sys
import time

from pydantic import Field

from lafid.item import Item
from lafid.stage import Resources, Stage, StageParams

import stage_registry


def wait_for(path: str, timeout_s: float) -> None:
    """Block until `path` exists: how a test holds a stage where it wants it."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


class CrashParams(StageParams):
    poison_dir: str = Field("", description="a file here named like the source kills the worker")


class CrashOnMarker(Stage):
    """Kills its own process on a poisoned source, as a segfaulting decoder would."""

    name = "crash_on_marker"
    Params = CrashParams
    default_resources = Resources(cpus=0.25)

    def process_item(self, item: Item) -> list[Item]:
        if os.path.exists(os.path.join(self.params.poison_dir, os.path.basename(item.source))):
            os._exit(1)
        return [item]


class BreakParams(StageParams):
    broken: str = Field("", description="once this file exists, setup fails (the machine broke)")


class CrashAndBreak(Stage):
    """Kills its worker and leaves the machine unable to start another (a GPU that fell off)."""

    name = "crash_and_break"
    Params = BreakParams
    default_resources = Resources(cpus=0.25)

    def setup(self) -> None:
        if os.path.exists(self.params.broken):
            raise RuntimeError("device lost")

    def process_item(self, item: Item) -> list[Item]:
        open(self.params.broken, "w").close()
        os._exit(1)


class MisrouteParams(StageParams):
    drop: str = Field("drop", description="items whose source name contains this are returned as nothing")
    duplicate: str = Field("dup", description="items whose source name contains this are returned twice")


class Misroute(Stage):
    """Returns no item, or two items, for some clips: a stage with a bug."""

    name = "misroute"
    Params = MisrouteParams
    default_resources = Resources(cpus=0.25)

    def process_item(self, item: Item) -> list[Item]:
        name = os.path.basename(item.source)
        if self.params.drop in name:
            return []
        if self.params.duplicate in name:
            return [item, copy.deepcopy(item)]
        return [item]


class SetupParams(StageParams):
    model_dir: str = Field("/nonexistent/model", description="where the (missing) model lives")


class FailSetup(Stage):
    """A stage whose model directory is missing: `setup()` raises."""

    name = "fail_setup"
    Params = SetupParams
    default_resources = Resources(cpus=0.25)

    def setup(self) -> None:
        raise FileNotFoundError(f"model_dir {self.params.model_dir} does not exist")

    def process_item(self, item: Item) -> list[Item]:
        return [item]


class GateParams(StageParams):
    open_when: str = Field("", description="items wait until this file exists")


class Gate(Stage):
    """Holds every item until a file appears: keeps a run busy for as long as a test needs."""

    name = "gate"
    Params = GateParams
    default_resources = Resources(cpus=0.25)

    def process_item(self, item: Item) -> list[Item]:
        wait_for(self.params.open_when, 300)
        return [item]


class SlowSetupParams(StageParams):
    pid_dir: str = Field("", description="setup writes its process id here and waits for a file named 'go'")


class SlowSetup(Stage):
    """Loads for as long as a test needs (a big model): its process can be killed during setup."""

    name = "slow_setup"
    Params = SlowSetupParams
    default_resources = Resources(cpus=0.25)

    def setup(self) -> None:
        open(os.path.join(self.params.pid_dir, str(os.getpid())), "w").close()
        wait_for(os.path.join(self.params.pid_dir, "go"), 120)

    def process_item(self, item: Item) -> list[Item]:
        return [item]


STAGES = (CrashOnMarker, CrashAndBreak, Misroute, FailSetup, Gate, SlowSetup)


def register() -> None:
    stage_registry.register(sys.modules[__name__])


def unregister() -> None:
    stage_registry.unregister(sys.modules[__name__])
