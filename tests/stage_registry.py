"""Registering a test module's stages so both executors (and Ray workers) can run them."""

from __future__ import annotations

from types import ModuleType

from lafid import registry


def register(module: ModuleType) -> None:
    """Add `module.STAGES` to the stage registry; cloudpickle ships the module by value,
    so Ray workers on any node run the stages without importing the tests."""
    from ray import cloudpickle

    for cls in module.STAGES:
        registry.STAGES[cls.name] = f"{module.__name__}:{cls.__name__}"
    cloudpickle.register_pickle_by_value(module)


def unregister(module: ModuleType) -> None:
    from ray import cloudpickle

    for cls in module.STAGES:
        registry.STAGES.pop(cls.name, None)
    cloudpickle.unregister_pickle_by_value(module)
