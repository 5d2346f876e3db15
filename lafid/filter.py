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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lafid.item import Item, Reject
from lafid.recipe import Recipe, RecipeError
from lafid.registry import stage_class
from lafid.report import read_table, require_output
from lafid.runner import recipe_fingerprint, recipe_stages
from lafid.schema import CLIP_COLUMNS, ITEM_COLUMNS, source_path
from lafid.shards import ShardWriter, read_manifest
from lafid.stage import Stage
from lafid.storage import OutputLock, prepare_output

log = logging.getLogger("lafid.filter")

_MEASURED = tuple(sorted(CLIP_COLUMNS - set(ITEM_COLUMNS)))


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


def redecide(row: dict, stages: list[Stage]) -> tuple[dict, Reject | None, bool]:
    """A stored clip row decided by `stages`: (columns, reject or None, never measured by a stage it
    would now reach). A rejected clip's row carries `stage` / `reason` / `detail`."""
    columns = {k: row[k] for k in _MEASURED if row.get(k) is not None}
    old = Reject(row["stage"], row["reason"], row["detail"] or "") if row.get("stage") else None
    names = [s.name for s in stages]
    if old and old.stage not in names:  # rejected outside the stages (input, router): not a decision
        return columns, old, False
    for i, stage in enumerate(stages):
        if old and i > names.index(old.stage):
            return columns, old, True  # passes now, but this stage never saw it
        if old and old.stage == stage.name and old.reason not in stage.DECISIONS:
            return columns, old, False  # the stage could not measure it
        full = {**columns, "start_s": row["start_s"], "end_s": row["end_s"]}
        derived = stage.derive(full)
        columns.update(derived)
        verdict = stage.decide({**full, **derived})
        if verdict:
            for later in stages[i + 1:]:  # as if the run had stopped here
                for name in later.writes:
                    columns.pop(name, None)
            return columns, Reject(stage.name, *verdict), False
    return columns, None, False


def filter_output(src: str | Path, recipe: Recipe, dest: str | Path) -> FilterStats:
    """Write `dest`: every clip of `src` decided again with `recipe`'s thresholds."""
    src, dest = Path(src), Path(dest)
    stages = check_recipe(measured_with(src), recipe)
    if dest.resolve() == src.resolve():
        raise FilterRefused(f"--out {dest} is the output being filtered: give a new folder")
    out = prepare_output(dest)
    stats = FilterStats()
    with OutputLock(out):
        writer = ShardWriter(out, recipe.output.rows_per_shard, recipe_fingerprint(recipe), stages=recipe_stages(recipe))
        videos: dict[str, list[Item]] = defaultdict(list)
        for kind in ("clips", "rejects"):
            table = read_table(src, kind)
            for row in table.to_pylist() if table is not None else []:
                videos[row["video_id"]].append(_item(row, stages, stats))
        for video_id in sorted(videos):
            if video_id in writer.completed:
                stats.skipped += 1
                continue
            writer.add_video(videos[video_id])
            stats.videos += 1
        writer.close()
    log.info("filter %s -> %s with %s: %d kept, %d rejected, %d changed, %d never measured by a stage they "
             "would now reach", src, out, recipe.name, stats.kept, stats.rejected, stats.changed, stats.unmeasured)
    return stats


def _item(row: dict, stages: list[Stage], stats: FilterStats) -> Item:
    item = Item(source=source_path(row), video_id=row["video_id"], clip_index=row["clip_index"],
                start_s=row["start_s"], end_s=row["end_s"])
    if row["clip_index"] < 0:  # a whole video: nothing was measured
        item.reject = Reject(row["stage"], row["reason"], row["detail"] or "")
    else:
        item.columns, item.reject, unmeasured = redecide(row, stages)
        stats.unmeasured += unmeasured
        was = (row.get("stage"), row.get("reason"))
        stats.changed += was != ((item.reject.stage, item.reject.reason) if item.reject else (None, None))
    stats.kept += not item.rejected
    stats.rejected += item.rejected
    return item
