"""`lafid filter`: decide every clip of a curate output again with another recipe's thresholds.

Every measured clip is stored with its columns, kept or rejected (docs/schema.md), and each
stage's keep/reject decision is a pure function of those columns and its `THRESHOLDS` params
(`Stage.derive`, `Stage.decide`). So a new recipe that changes thresholds only is replayed from
the shards, with no decoding and no models, into a new output written by the same `ShardWriter`
(same schema, manifest, the new recipe's fingerprint). A recipe that changes anything else (a
sample rate, a model, a detector) would need new measurements and is refused, naming the parameter.

A clip the old recipe rejected before a stage measured it (an earlier stage said no, or the
stage failed to measure) cannot be judged by that stage: it stays rejected with its old reason,
and `FilterStats.unmeasured` counts the ones the new thresholds would have let through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lafid.item import Reject
from lafid.recipe import Recipe, RecipeError
from lafid.registry import stage_class
from lafid.report import require_output
from lafid.runner import recipe_fingerprint, recipe_stages
from lafid.schema import CLIP_SCHEMA, REJECT_SCHEMA, SCHEMA_VERSION
from lafid.shards import KINDS, ShardWriter, read_clips, read_manifest
from lafid.stage import Stage
from lafid.storage import open_output

log = logging.getLogger("lafid.filter")


class FilterRefused(RecipeError):
    """The new recipe needs measurements the output does not have."""


@dataclass
class FilterStats:
    videos: int = 0
    kept: int = 0
    rejected: int = 0
    changed: int = 0  # clips whose keep/reject or reason differs from the input's
    unmeasured: int = 0  # clips the new thresholds would pass at a stage, but a later stage never measured
    skipped: int = 0  # videos already in the destination (a resumed filter)


def measured_with(out_dir: Path) -> list[list]:
    """The [stage, params] list of the recipe that measured an output (one recipe only)."""
    require_output(out_dir)
    entries = read_manifest(out_dir)
    if any("stages" not in e for e in entries) or not entries:
        raise FilterRefused(f"{out_dir} does not record its recipe's parameters (written before `lafid filter` "
                            "existed): curate it again to filter it")
    recipes = {repr(e["stages"]) for e in entries}
    if len(recipes) > 1:
        raise FilterRefused(f"{out_dir} was written with {len(recipes)} different recipes "
                            "(--allow-recipe-change): filter needs one")
    return entries[0]["stages"]


def check_recipe(old: list[list], recipe: Recipe) -> list[Stage]:
    """The new recipe's stages, built without their models, once it is shown to change thresholds only."""
    new = recipe_stages(recipe)
    if [n for n, _ in new] != [n for n, _ in old]:
        raise FilterRefused(f"recipe {recipe.name!r} runs stages {[n for n, _ in new]}, the output was measured by "
                            f"{[n for n, _ in old]}: filter re-decides the same stages only")
    for (name, params), (_, was) in zip(new, old):
        cls = stage_class(name)
        for key, value in params.items():
            if value != was.get(key) and key not in cls.THRESHOLDS:
                raise FilterRefused(f"{name}.{key} changes what is measured ({was.get(key)!r} -> {value!r}), "
                                    f"not a threshold: curate the footage again with recipe {recipe.name!r}")
    return recipe.build_stages()


@dataclass
class Decision:
    reject: Reject | None  # None: kept
    derived: dict  # columns that follow from the new thresholds
    stopped_at: int | None = None  # index of the stage that now rejects: later stages' columns are emptied
    unmeasured: bool = False  # passes now, but a later stage never measured it


def redecide(row: dict, stages: list[Stage]) -> Decision:
    """A stored clip row (its `DECIDES_ON` columns, `stage` / `reason` / `detail` when rejected) decided
    again by `stages`."""
    old = Reject(row["stage"], row["reason"], row["detail"] or "") if row.get("stage") else None
    names = [s.name for s in stages]
    if old and old.stage not in names:  # rejected outside the stages (input, router): not a decision
        return Decision(old, {})
    derived: dict = {}
    for i, stage in enumerate(stages):
        if old and i > names.index(old.stage):
            return Decision(old, derived, unmeasured=True)
        if old and old.stage == stage.name and old.reason not in stage.DECISIONS:
            return Decision(old, derived)  # the stage could not measure it
        derived.update(stage.derive({**row, **derived}))
        verdict = stage.decide({**row, **derived})
        if verdict:
            return Decision(Reject(stage.name, *verdict), derived, stopped_at=i)
    return Decision(None, derived)


def filter_output(src: str | Path, recipe: Recipe, dest: str | Path) -> FilterStats:
    """Write `dest`: every clip of `src` decided again with `recipe`'s thresholds."""
    src, dest = Path(src), Path(dest)
    stages = check_recipe(measured_with(src), recipe)
    if dest.resolve() == src.resolve():
        raise FilterRefused(f"--out {dest} is the output being filtered: give a new folder")
    with open_output(dest) as (out, _):
        writer = ShardWriter(out, recipe.output.rows_per_shard, recipe_fingerprint(recipe), stages=recipe_stages(recipe))
        table = all_rows(src)
        stats = FilterStats(skipped=len(writer.completed & set(table["video_id"].to_pylist())))
        if writer.completed:  # a resumed filter: those videos are in
            table = table.filter(pc.invert(pc.is_in(table["video_id"], pa.array(sorted(writer.completed)))))
        table, kept = _decide(table, stages, stats)
        writer.add_tables(_as(table.filter(kept), CLIP_SCHEMA), _as(table.filter(pc.invert(kept)), REJECT_SCHEMA))
        stats.videos = len(set(table["video_id"].to_pylist()))
    log.info("filter %s -> %s with %s: %d kept, %d rejected, %d changed, %d never measured by a stage they "
             "would now reach", src, out, recipe.name, stats.kept, stats.rejected, stats.changed, stats.unmeasured)
    return stats


def all_rows(src: Path, columns: set[str] | None = None) -> pa.Table:
    """Clip and reject rows of an output as one table in the reject schema (clips: no stage), only `columns`
    (in schema order) when given: a sweep reads what the decisions read, not every measurement."""
    fields = [f for f in REJECT_SCHEMA if columns is None or f.name in columns]
    schema = pa.schema(fields, metadata=REJECT_SCHEMA.metadata)
    tables = [_as(t, schema) for kind in ("clips", "rejects")
              if (t := read_clips(src, [f.name for f in fields if f.name in KINDS[kind].names], kind)) is not None]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def decision_columns(stages: list[Stage]) -> set[str]:
    """The columns `redecide` reads for `stages`."""
    return {"video_id", "clip_index", "start_s", "end_s", "stage", "reason", "detail",
            *(c for s in stages for c in s.DECIDES_ON)}


def decision_rows(table: pa.Table, stages: list[Stage]) -> list[dict]:
    """The rows of `table` (see `all_rows`) as dicts of what `redecide` reads."""
    return table.select(sorted(decision_columns(stages))).to_pylist()


def _as(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table`'s columns in `schema` (missing ones null), schema metadata included."""
    n = table.num_rows
    return pa.Table.from_arrays([table[f.name] if f.name in table.column_names else pa.nulls(n, f.type)
                                 for f in schema], schema=schema)


def _decide(table: pa.Table, stages: list[Stage], stats: FilterStats) -> tuple[pa.Table, pa.Array]:
    """Every clip row decided again: the table with new stage/reason/detail, derived columns and the columns
    of stages a clip no longer reaches emptied; and the mask of kept rows. Only the columns the decisions
    read are turned into Python objects."""
    rows = decision_rows(table, stages)
    decisions = [Decision(Reject(r["stage"], r["reason"], r["detail"] or ""), {}) if r["clip_index"] < 0
                 else redecide(r, stages) for r in rows]
    for r, d in zip(rows, decisions):
        if r["clip_index"] >= 0:
            stats.unmeasured += d.unmeasured
            stats.changed += (r["stage"], r["reason"]) != ((d.reject.stage, d.reject.reason) if d.reject else (None, None))
    kept = pa.array([d.reject is None for d in decisions])
    stats.kept, stats.rejected = sum(kept.to_pylist()), len(rows) - sum(kept.to_pylist())
    columns = {"schema_version": pa.array([SCHEMA_VERSION] * len(rows), pa.int16())}
    for key in ("stage", "reason", "detail"):
        columns[key] = pa.array([getattr(d.reject, key) if d.reject else None for d in decisions], pa.string())
    for k, stage in enumerate(stages):  # a clip a stage no longer reaches has none of its columns
        cut = [d.stopped_at is not None and d.stopped_at < k for d in decisions]
        for name in stage.writes if any(cut) else ():
            columns[name] = pc.if_else(pa.array(cut), pa.scalar(None, REJECT_SCHEMA.field(name).type), table[name])
    for name in sorted({k for d in decisions for k in d.derived}):  # derived columns are read: their values are here
        before = columns[name].to_pylist() if name in columns else [r[name] for r in rows]
        columns[name] = pa.array([d.derived.get(name, was) for was, d in zip(before, decisions)],
                                 REJECT_SCHEMA.field(name).type)
    for name, values in columns.items():
        table = table.set_column(table.schema.get_field_index(name), REJECT_SCHEMA.field(name), values)
    return table, kept
