"""Recipes: YAML files that name the stages, their workers and their parameters.

Parsed with `yaml.safe_load` and validated by pydantic, including every stage's
own `Params`, and in order: every column or work field a stage declares it reads
(`Stage.reads`, `Stage.reads_work`) must be written by an earlier stage, and no
stage may be listed twice. A wrong key, value or order fails before any video is
touched.
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

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

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, stage: str) -> str:
        stage_class(stage)
        return stage

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        """Every parameter of the stage checked at once, so one message names all that fail."""
        if "stage" not in info.data:  # the stage itself is wrong: that is the error to report
            return params
        try:
            stage_class(info.data["stage"]).Params(**params)
        except ValidationError as exc:
            raise PydanticCustomError("stage_params", "{problems}", {"problems": "; ".join(_problems(exc))}) from None
        return params

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
    pools: Literal["per_stage", "chain", "auto"] = Field(
        "per_stage", description="Ray runner: a pool of actors per stage (`per_stage`), or one pool whose actors "
        "each run every stage on whole videos (`chain`: one process and no hand-offs per video, for CPU-only "
        "recipes); `auto`: `chain` where the cluster cannot give every stage an actor of its own CPUs")

    @model_validator(mode="after")
    def _stage_order(self) -> "Recipe":
        check_order([stage_class(spec.stage) for spec in self.stages])
        return self

    @model_validator(mode="after")
    def _chain_fits(self) -> "Recipe":
        """A chain runs every stage in each actor: per-stage GPUs and worker counts cannot apply to it."""
        if self.pools == "chain":
            for spec in self.stages:
                if spec.gpus or stage_class(spec.stage).default_resources.gpus:
                    raise ValueError(f"pools: chain runs every stage in each actor, but stage {spec.stage!r} asks "
                                     "for GPUs; use pools: per_stage")
                if spec.workers != "auto":
                    raise ValueError(f"pools: chain runs every stage in each actor, but stage {spec.stage!r} sets "
                                     f"workers: {spec.workers}; leave it auto or use pools: per_stage")
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
    bundled = resources.files("lafid.pipelines").joinpath(f"{recipe}.yaml")
    if bundled.is_file():
        return Path(str(bundled))
    raise RecipeError(f"recipe not found: no bundled recipe named {recipe!r} (bundled: {names}; "
                      f"for a file give a path, e.g. ./{recipe}.yaml)")


def describe(recipe: str | Path) -> str:
    """One line saying which recipe file an argument resolves to, for the console."""
    path = resolve(recipe)
    return f"recipe: {path}" if looks_like_path(recipe) else f"recipe: bundled {recipe} ({path})"


def bundled_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lafid.pipelines").iterdir() if p.name.endswith(".yaml"))


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything this big is not one


def _read_text(path: Path) -> str:
    size = path.stat().st_size
    if size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{path}: {size} bytes is too big for a recipe (at most {MAX_RECIPE_BYTES} bytes)")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line})") from None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as one line: where, and what (PyYAML's own text spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if isinstance(exc, yaml.constructor.ConstructorError) and "tag" in problem:
        problem += " (recipes are plain YAML: no tags that build Python objects)"
    return f"not valid YAML{where}: {problem}"


_BRANCH = re.compile(r"[\[\-(]|^(int|float|str|bool|dict|list|none)$")  # pydantic's names for union members
_MISMATCH = ("_type", "literal_error", "model_attributes_type")


def _problems(exc: ValidationError, data: Any = None) -> list[str]:
    """One readable line per failing key: union members' errors are merged (the member whose type
    matched the value says what is wrong with it), a stage is named, the value given is shown."""
    groups: dict[tuple, list[dict]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _BRANCH.search(p)))
        groups.setdefault(loc, []).append(err)
    out = []
    for loc, errs in groups.items():
        fitting = [e for e in errs if not e["type"].endswith(_MISMATCH)] or errs
        msg = " or ".join(dict.fromkeys(e["msg"].removeprefix("Value error, ") for e in fitting))
        value = fitting[0].get("input")
        plain = fitting[0]["type"] not in ("missing", "value_error")  # those say it themselves
        got = f" (got {value!r})" if plain and isinstance(value, (int, float, str)) else ""
        out.append(f"{_where(loc, data)}: {msg}{got}" if errs[0]["type"] != "stage_params" else
                   f"{_where(loc[:-1], data)} params: {msg}")
    return out


def _where(loc: tuple, data: Any) -> str:
    """`stages.1.workers` as `stage 2 (face_constraints) workers`."""
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int) and isinstance(data, dict):
        stages = data.get("stages")
        spec = stages[loc[1]] if isinstance(stages, list) and loc[1] < len(stages) else None
        name = f" ({spec['stage']})" if isinstance(spec, dict) and isinstance(spec.get("stage"), str) else ""
        return " ".join([f"stage {loc[1] + 1}{name}", ".".join(str(p) for p in loc[2:])]).strip()
    return ".".join(str(p) for p in loc) or "(top)"


def load_yaml_model(recipe: str | Path, model: type[M]) -> M:
    """Parse a recipe file safely into `model`; every error is one line naming the file, and each
    failing key (all of them, every stage's parameters included)."""
    path = resolve(recipe)
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: {_yaml_problem(exc)}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values")
    try:
        return model(**data)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {'; '.join(_problems(exc, data))}") from None


def load_recipe(recipe: str | Path) -> Recipe:
    return load_yaml_model(recipe, Recipe)
