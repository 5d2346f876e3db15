"""The Ray executor: one autoscaling actor pool per stage, streamed with a bounded window.

This package is the only code that imports ray. Each stage runs in its own pool of
actors (`workers`: a fixed number, `auto`, or `{min, max}`); a pool starts at its
minimum, grows while more batches wait than its actors can take and the cluster has room
(or another pool has an idle actor to give), and gives back an actor that has been idle for
`IDLE_S` seconds. `auto` pools ask
for a share of a CPU scaled to the cluster (see `plan.plan_pools`), so the same recipe fits a
2-core laptop and fills a large cluster. The driver keeps at most
`max_videos_in_flight` videos between source and writer, so memory stays flat
however long the input list is. Where items go is decided by `lafid.router`.

Data stays in the object store: an actor returns two objects, the items it made
(decoded faces, audio: they stay where they were made, in Ray's object store) and a
small summary (per item: its key, its reject if any, and its output row only when it
goes to the writer). The driver routes on summaries and hands the next pool the
*reference* to the previous pool's items; the next actor picks its items out of it.

Failures of the machinery are not failures of the media:
- every actor must report its stage set up before any work is handed out; a
  stage whose `setup()` raises stops the run with its own error, while an actor
  whose process dies while setting up (OOM killer, lost node) is replaced, up to
  `SETUP_RETRIES` times in a row per stage;
- an actor that dies leaves its pool and a fresh one is started in its place;
  its batch is retried, each item alone, and only an item that kills its worker
  `max_item_retries` times on its own becomes a `worker_crashed` reject;
- working data lost with a node (an object that cannot be fetched) sends the
  videos it belonged to back to the first stage; nothing is recorded for them
  until they come through again;
- a pool left with no live actor that cannot start a new one fails the run.

Modules: `cluster` starts or joins Ray; `plan` sizes the pools; `pool` holds one stage's
actors; `actor` is what runs in an actor's process; `stream` is the driver loop and `run_ray`.
"""

import importlib

# The driver's names, imported when first used: every actor's process imports this package (for
# `actor`), and must not import the driver's modules with it.
_DRIVER = {"RunInfo": "lafid.progress", "gcs_status": "lafid.ray_executor.cluster",
           "init_ray": "lafid.ray_executor.cluster", "shutdown_ray": "lafid.ray_executor.cluster",
           "run_ray": "lafid.ray_executor.stream"}

__all__ = sorted(_DRIVER)


def __getattr__(name: str):
    if name not in _DRIVER:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_DRIVER[name]), name)
