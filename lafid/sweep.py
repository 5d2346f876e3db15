"""Threshold sweeps for `lafid report`: clips kept at a range of values of each threshold.

Replays the decisions of `lafid.filter` on the stored measurements of an output, once
per value, changing one threshold of the recipe that wrote it at a time. A clip an
earlier stage rejected before this one measured it counts as not kept at every value
(as `lafid filter` would leave it), so the curve is what filtering would give.
"""

from __future__ import annotations

from pathlib import Path

from lafid.filter import FilterRefused, all_rows, decision_columns, decision_rows, measured_with, redecide
from lafid.registry import stage_class

FACTORS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # times the current value
FROM_ZERO = (0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)  # a threshold now at 0 (off)


def sweeps(out_dir: str | Path) -> list[dict]:
    """One sweep per numeric threshold: {stage, param, current, values, kept}; [] for an output that does not
    record its recipe's parameters."""
    try:
        recorded = measured_with(Path(out_dir))
    except FilterRefused:
        return []
    base = [stage_class(name)(params) for name, params in recorded]
    table = all_rows(Path(out_dir), decision_columns(base))  # only what the decisions read
    rows = [r for r in decision_rows(table, base) if r["clip_index"] >= 0]
    out = []
    for k, (name, params) in enumerate(recorded):
        cls = stage_class(name)
        for param in sorted(cls.THRESHOLDS):
            current = params[param]
            if isinstance(current, bool) or not isinstance(current, (int, float)):
                continue
            values, kept = [], []
            for value in sorted({current * f for f in FACTORS} if current else set(FROM_ZERO)):
                try:
                    changed = cls({**params, param: type(current)(value)})
                except ValueError:  # outside the parameter's range
                    continue
                stages = base[:k] + [changed] + base[k + 1:]
                values.append(value)
                kept.append(sum(redecide(r, stages).reject is None for r in rows))
            out.append({"stage": name, "param": param, "current": current, "values": values, "kept": kept})
    return out
