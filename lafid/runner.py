"""Run a recipe over source videos: sequentially in-process, or on Ray.

Both executors feed the same `StageWorker`s and hand every batch's result to one
`Router` (`lafid.router`), which sends rejected and finished items to one
`ShardWriter`, so their outputs are the same rows. `lafid.ray_executor` is the
only package that imports ray.

`curate` first proves the output folder is usable and takes its lock (one run per
folder), logs the run to `_curate.log` there (tracebacks included), appends its
run record to `_runs.jsonl` there (`lafid.run_record`), and does not start an
executor when every input is already done. While an executor runs, what
other code prints goes to `_native.log` there (`lafid.native`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from lafid.item import Item
from lafid.native import NATIVE_LOG, lines_since, native_output_to, size as native_size
from lafid.progress import RunStats
from lafid.recipe import Recipe
from lafid.registry import stage_class
from lafid.router import Router, setup_failed
from lafid.run_record import recording
from lafid.shards import ShardWriter
from lafid.stage import StageWorker
from lafid.storage import (RemoteOutput, is_url, list_url, local_path, open_output, remove_stale_temporaries,
                           url_content_id)
from lafid.video import content_id

LOG = "_curate.log"
log = logging.getLogger("lafid.run")

# Folder scans list files with these extensions: video containers and audio
# containers (an audio-only file becomes a `no_video_stream` reject row rather than
# being skipped unseen). Files given by name are attempted whatever their extension.
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".divx", ".flv", ".f4v", ".wmv", ".asf",
    ".mpg", ".mpeg", ".m2v", ".vob", ".ts", ".mts", ".m2ts", ".m2t", ".3gp", ".3g2", ".ogv", ".mxf",
    ".dv", ".rm", ".rmvb", ".y4m", ".h264", ".264", ".h265", ".265", ".hevc",
    ".m4a", ".mp3", ".wav", ".aac", ".flac", ".ogg", ".oga", ".opus", ".wma", ".mka", ".weba",
    ".amr", ".aif", ".aiff",
})


def list_sources(inputs: Iterable[str]) -> list[str]:
    """Absolute paths of the sources to curate, each once, in a stable order.

    A file given by name is listed whatever its extension, even when it is missing
    or unreadable (it becomes a reject row). A folder is searched recursively for
    files with a media extension (`VIDEO_EXTENSIONS`), following symlinked folders;
    a folder already searched (by its real path) is not searched again, so symlink
    loops end. A folder with a media extension is listed as well as searched, so the
    ledger says why it holds no video."""
    out: list[str] = []
    seen_files: set[str] = set()
    seen_dirs: set[str] = set()

    def add(path: str) -> None:
        path = os.path.abspath(path)
        if path not in seen_files:
            seen_files.add(path)
            out.append(path)

    for entry in inputs:
        entry = local_path(entry)
        if is_url(entry):  # object storage: the object, or every media object under the prefix
            for url in list_url(entry, VIDEO_EXTENSIONS):
                if url not in seen_files:
                    seen_files.add(url)
                    out.append(url)
        elif os.path.isdir(entry):
            if _media_name(os.path.normpath(entry)):  # given by name: it becomes a not_a_file row
                add(entry)
            for path in _scan(entry, seen_dirs):
                add(path)
        else:
            add(entry)
    return out


def _scan(folder: str, seen_dirs: set[str]) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        # a folder named like a video (x.mp4/) is listed too: it becomes a `not_a_file` reject row
        found.extend(os.path.join(root, name) for name in files + dirs if _media_name(name))
    return sorted(found)


def _media_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS


def source_items(sources: list[str], writer: ShardWriter, stats: RunStats) -> Iterator[Item]:
    """One item per new video. Finished videos (resume) are skipped; a second file with
    the same content becomes a `duplicate_content` reject, so the ledger explains it."""
    first_path: dict[str, str] = {}
    for source in sources:
        video_id = url_content_id(source) if is_url(source) else content_id(source)
        if video_id in first_path:
            path_key = hashlib.sha1(os.fsencode(os.path.abspath(source))).hexdigest()[:8]
            duplicate_id = f"{video_id}~{path_key}"
            if duplicate_id in writer.completed:
                stats.videos_skipped += 1
            else:
                yield Item(source=source, video_id=duplicate_id).drop(
                    "input", "duplicate_content", f"same content as {first_path[video_id]}")
            continue
        first_path[video_id] = source
        if video_id in writer.completed:
            stats.videos_skipped += 1
        else:
            yield Item(source=source, video_id=video_id)


def recipe_fingerprint(recipe: Recipe) -> str:
    """Hash of what decides the rows: the stages in order and every parameter (defaults included).

    Workers, batch sizes and output sizes change how a run is scheduled, not its rows."""
    return hashlib.sha256(json.dumps(recipe_stages(recipe), sort_keys=True).encode()).hexdigest()[:16]


def recipe_stages(recipe: Recipe) -> list[list]:
    """[stage, every parameter (defaults included)] in order, as JSON data."""
    return [[spec.stage, stage_class(spec.stage).Params(**spec.params).model_dump(mode="json")]
            for spec in recipe.stages]


def run_sequential(recipe: Recipe, items: Iterable[Item], router: Router) -> None:
    """Every stage in this process, depth first: each batch goes all the way to the
    writer before the next is started, so memory does not grow with video length.
    Every stage is set up before the first video is read."""
    stages = recipe.build_stages()
    workers: list[StageWorker] = []
    try:
        for i, stage in enumerate(stages):
            try:
                workers.append(StageWorker(stage, last=i == len(stages) - 1))
            except Exception as exc:
                log.exception("stage %s failed to set up", stage.name)
                raise setup_failed(stage.name, exc) from exc

        def push(pending: list[Item], level: int) -> None:
            spec, worker = recipe.stages[level], workers[level]
            for start in range(0, len(pending), spec.batch_size):
                given = pending[start:start + spec.batch_size]
                out, stats = worker.run(given)
                router.stats.stage(spec.stage, stats)
                onward = router.done(level, given, out)
                if onward:
                    push(onward, level + 1)

        for video in items:
            first = router.admit(video)
            if first:
                push(first, 0)
    finally:
        for worker in workers:
            worker.close()


@contextmanager
def _ctrl_c_between_batches() -> Iterator[Callable[[], None]]:
    """Yields a check for the router to call between batches. The first Ctrl-C is acted on there: raised
    anywhere, inside an import or a native call, KeyboardInterrupt can come out as another error (a
    stage "failing to set up") or be swallowed. A second Ctrl-C stops at once."""
    pressed: list[bool] = []

    def check() -> None:
        if pressed:
            raise KeyboardInterrupt

    def handler(signum, frame) -> None:
        check()
        pressed.append(True)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield check
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, previous)


def _log_to(out_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(out_dir / LOG, encoding="utf-8", errors="backslashreplace")  # paths need not be UTF-8
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("lafid")
    logger.addHandler(handler)
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    return handler


def curate(
    recipe: Recipe,
    inputs: Iterable[str],
    out_dir: str | os.PathLike,
    executor: str = "ray",
    address: str | None = None,
    num_cpus: int | None = None,
    on_update: Callable[[RunStats], None] | None = None,
    retry_failed: bool = False,
    allow_recipe_change: bool = False,
) -> RunStats:
    """Curate `inputs` into `out_dir`; resumable and idempotent (see lafid.shards).

    `retry_failed` redoes finished videos that have `worker_crashed` or `stage_error`
    rows, replacing all their rows. Raises `lafid.storage.OutputError` for an unusable
    or busy output folder or a recipe other than the one it was written with, and
    `lafid.router.RunFailed` when the run cannot go on (a stage that cannot set up)."""
    if executor not in ("ray", "sequential"):
        raise ValueError(f"unknown executor {executor!r}: use 'ray' or 'sequential'")
    with open_output(out_dir, logs=True) as (out, remote):  # object storage: a local staging folder
        handler = _log_to(out)
        stats = RunStats()
        try:
            with recording(out, recipe.name, recipe_fingerprint(recipe), executor, stats):
                return _curate_locked(recipe, inputs, out, executor, address, num_cpus, on_update,
                                      retry_failed, allow_recipe_change, stats, remote)
        except KeyboardInterrupt:  # logged where it was acted on, without a traceback
            raise
        except BaseException:
            log.exception("run into %s failed", remote.url if remote else out)
            raise
        finally:
            logging.getLogger("lafid").removeHandler(handler)
            handler.close()


def _curate_locked(recipe, inputs, out, executor, address, num_cpus, on_update, retry_failed,
                   allow_recipe_change, stats: RunStats, remote: RemoteOutput | None = None) -> RunStats:
    fingerprint = recipe_fingerprint(recipe)
    log.info("run: recipe %s (fingerprint %s), executor %s", recipe.name, fingerprint, executor)
    stale = remove_stale_temporaries(out)
    if stale:
        log.info("removed %d temporary files left by an interrupted run", len(stale))
    writer = ShardWriter(out, recipe.output.rows_per_shard, fingerprint, allow_recipe_change, recipe_stages(recipe))
    if remote:
        writer.on_flush = remote.push  # each flush's shards, then its manifest, go to the store
    if retry_failed:
        log.info("%d finished videos have worker_crashed/stage_error rows: redone if given", writer.retry_failed())
    sources = list_sources(inputs)
    stats.videos_total = len(sources)
    router = Router([spec.stage for spec in recipe.stages], writer, stats, on_update)
    items = source_items(sources, writer, stats)
    first = next(items, None)
    if first is None:
        log.info("nothing to do: all %d videos are done", len(sources))
        return stats
    items = itertools.chain([first], items)
    stats.native_log = str(out / NATIVE_LOG)
    start = native_size(stats.native_log)
    # the terminal keeps lafid's own lines only; Ctrl-C stops the run between batches
    with native_output_to(stats.native_log), _ctrl_c_between_batches() as router.checkpoint:
        try:
            if executor == "sequential":
                run_sequential(recipe, items, router)
            else:
                from lafid.ray_executor import run_ray

                stats.ray = run_ray(recipe, items, router, address=address, num_cpus=num_cpus)
        except KeyboardInterrupt:
            writer.close()  # videos finished before it are recorded; the rest is redone by a rerun
            log.info("interrupted (Ctrl-C): %d videos recorded", stats.videos_done)
            raise
    stats.native_lines = lines_since(stats.native_log, start)
    if stats.native_lines:
        log.info("other code (native libraries, dependencies' warnings) wrote %d lines to %s", stats.native_lines,
                 stats.native_log)
    writer.close()
    router.finish()
    log.info("done: %d videos, %d clips kept, %d rows rejected", stats.videos_done, stats.kept, stats.rejected)
    return stats
