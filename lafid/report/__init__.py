"""What a curate output holds, for people: `lafid inspect` (terminal tables) and `lafid report` (one HTML page).

- `summary`: the terminal tables of `lafid inspect`.
- `collect`: every number of the report, from the shards and the run record the runner writes.
- `figures`: those numbers as matplotlib plots.
- `sheet`: face crops cut from the source videos along each clip's subject track.
- `html`: the self-contained page, and `report`, which makes and writes it all.
"""

from lafid.report.summary import count_table, require_output, summary

__all__ = ["count_table", "require_output", "summary"]
