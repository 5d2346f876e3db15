"""Recipes: YAML files that name the stages, their workers and their parameters.

Parsed with `yaml.safe_load` and validated by pydantic, including every stage's
own `Params`, and in order: every column or work field a stage declares it reads
(`Stage.reads`, `Stage.reads_work`) must be written by an earlier stage, and no
stage may be listed twice. A wrong key, value or order fails before any video is
touched.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lafid.registry import stage_class
from lafid.schema import CLIP_COLUMNS, ITEM_COLUMNS
from lafid.stage import Resources, Stage


M = TypeVar("M", bound=BaseModel)


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file, key and problem."""


class StrictModel(BaseModel):
    """A recipe section: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid")


class WorkerRange(StrictModel):
    """A pool that grows with its queue up to `max` actors and shrinks back to `min` when idle."""

    min: int = Field(1, ge=1, description="actors the pool never goes below")
    max: int | None = Field(None, ge=1, description="actors the pool never goes above; default: as many as fit")

    @model_validator(mode="after")
    def _ordered(self) -> "WorkerRange":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class StageSpec(StrictModel):
    stage: str = Field(description="stage name, see lafid.registry")
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] | WorkerRange = Field(
        "auto", description="actors in this stage's pool (Ray runner): a fixed number, `auto` (from one actor up "
                            "to what the cluster has, CPU requests scaled to fit), or {min, max}")
    cpus: float | None = Field(None, gt=0, description="CPUs per worker; default: the stage's own")
    gpus: float = Field(0.0, ge=0)
    memory_gb: float = Field(0.0, ge=0)
    batch_size: int = Field(1, ge=1, description="items handed to a worker at once")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_stage(self) -> "StageSpec":
        stage_class(self.stage)
        return self

    @property
    def worker_range(self) -> tuple[int, int | None]:
        """(min, max) actors of the pool; max None: as many as the cluster fits."""
        if self.workers == "auto":
            return 1, None
        if isinstance(self.workers, WorkerRange):
            return self.workers.min, self.workers.max
        return self.workers, self.workers

    def build(self) -> Stage:
        cls = stage_class(self.stage)
        base = cls.default_resources
        res = Resources(cpus=self.cpus or base.cpus, gpus=self.gpus or base.gpus,
                        memory_gb=self.memory_gb or base.memory_gb)
        return cls(cls.Params(**self.params), res)


class OutputSpec(StrictModel):
    rows_per_shard: int = Field(1000, ge=1, description="clip rows per Parquet shard")


class Recipe(StrictModel):
    name: str
    description: str = ""
    stages: list[StageSpec] = Field(min_length=1)
    output: OutputSpec = Field(default_factory=OutputSpec)
    max_videos_in_flight: int = Field(4, ge=1, description="videos decoded at once: bounds memory")
    max_item_retries: int = Field(2, ge=1, description="times an item, run alone, may kill its worker "
                                  "before it becomes a worker_crashed reject (Ray runner)")

    @model_validator(mode="after")
    def _valid_params(self) -> "Recipe":
        for spec in self.stages:
            stage_class(spec.stage).Params(**spec.params)
        return self

    @model_validator(mode="after")
    def _stage_order(self) -> "Recipe":
        check_order([stage_class(spec.stage) for spec in self.stages])
        return self

    def build_stages(self) -> list[Stage]:
        return [spec.build() for spec in self.stages]


def check_order(stages: list[type[Stage]]) -> None:
    """Every column and work field a stage reads is written by an earlier stage; no stage twice."""
    seen: set[str] = set()
    columns, work = set(ITEM_COLUMNS), set()
    for cls in stages:
        if cls.name in seen:
            raise ValueError(f"stage {cls.name!r} is listed twice")
        seen.add(cls.name)
        unknown = sorted(set(cls.reads + cls.writes) - CLIP_COLUMNS)
        if unknown:
            raise ValueError(f"stage {cls.name!r} declares columns not in lafid.schema: {', '.join(unknown)}")
        missing = [c for c in cls.reads if c not in columns] + [f"work.{w}" for w in cls.reads_work if w not in work]
        if missing:
            later = sorted(_writers(missing))
            hint = f" (written by {', '.join(later)}: list it earlier)" if later else ""
            raise ValueError(f"stage {cls.name!r} reads {', '.join(missing)}, which no earlier stage writes{hint}")
        columns |= set(cls.writes)
        work |= set(cls.writes_work)


def _writers(missing) -> set[str]:
    """Names of the registered stages that write any of `missing`."""
    from lafid.registry import STAGES

    wanted = set(missing)
    found = set()
    for name in STAGES:
        cls = stage_class(name)
        if wanted & (set(cls.writes) | {f"work.{w}" for w in cls.writes_work}):
            found.add(name)
    return found


def looks_like_path(recipe: str | Path) -> bool:
    """A `Path`, or a string with a path separator or a .yaml/.yml suffix; anything else is a bundled name."""
    if isinstance(recipe, Path):
        return True
    text = str(recipe)
    return "/" in text or os.sep in text or text.lower().endswith((".yaml", ".yml"))


def resolve(recipe: str | Path) -> Path:
    """The file of a recipe: a path if the argument looks like one (see `looks_like_path`), else the
    bundled recipe of that name in `pipelines/` ("demo", "lafid180k"). A file in the working folder
    named like a bundled recipe never shadows it: write `./demo` to mean the file."""
    names = ", ".join(bundled_names())
    if looks_like_path(recipe):
        path = Path(recipe)
        if path.is_dir():
            raise RecipeError(f"recipe {path} is a folder, not a file (bundled recipes are named without "
                              f"a suffix: {names})")
        if not path.is_file():
            raise RecipeError(f"recipe not found: no file {path} (bundled recipes are named without a suffix: "
                              f"{names})")
        return path
    bundled = resources.files("pipelines").joinpath(f"{recipe}.yaml")
    if bundled.is_file():
        return Path(str(bundled))
    raise RecipeError(f"recipe not found: no bundled recipe named {recipe!r} (bundled: {names}; "
                      f"for a file give a path, e.g. ./{recipe}.yaml)")


def describe(recipe: str | Path) -> str:
    """One line saying which recipe file an argument resolves to, for the console."""
    path = resolve(recipe)
    return f"recipe: {path}" if looks_like_path(recipe) else f"recipe: bundled {recipe} ({path})"


def bundled_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("pipelines").iterdir() if p.name.endswith(".yaml"))


def load_yaml_model(recipe: str | Path, model: type[M]) -> M:
    """Parse a recipe file safely into `model`; every error names the file and key."""
    path = resolve(recipe)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    try:
        return model(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors()
        )
        raise RecipeError(f"{path}: {problems}") from None


def load_recipe(recipe: str | Path) -> Recipe:
    return load_yaml_model(recipe, Recipe)
