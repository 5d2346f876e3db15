"""Files of an output folder: preflight, the run lock, atomic writes, stale temporaries,
the manifest's lines, and object storage. `open_output` opens a folder or URL for one run
(curate, export, filter); `filesystem` is the one filesystem layer (`pyarrow.fs`) readers of
an output go through (`lafid.shards.read_clips`).

Every file lafid writes into an output folder goes through here: Parquet and text
are written to a `.tmp-` name and renamed, so readers never see half a file; a run
holds an exclusive lock on the folder for its whole life, so two runs never write
into the same folder at once; and temporaries a crashed run left behind are
removed when the next run takes the lock.

Inputs and outputs may also be URLs (`s3://bucket/prefix`, `gs://...`, `file://...`),
read and written through `pyarrow.fs`; an S3-compatible endpoint comes from the
standard `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) variable. Object stores have
no rename and no lock: a `RemoteOutput` keeps a local staging folder (where the lock
and the atomic renames happen) and uploads each shard under its final,
content-derived name once it is complete, then the manifest, as one whole object;
a shard no manifest names is deleted by the next run, as in a local folder. Input
URLs are copied once per node into a local cache before a stage reads them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pyarrow.parquet as pq

LOCK = "_lock"
TMP_PREFIX = ".tmp-"


class OutputError(Exception):
    """An output folder that cannot be used; the message says which and why."""


class OutputBusy(OutputError):
    """Another run holds the output folder."""


def prepare_output(out_dir: str | os.PathLike) -> Path:
    """Create `out_dir` if needed and prove it is a writable folder, before any work."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"output {out} exists and is not a folder") from None
    except OSError as exc:
        raise OutputError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    if not out.is_dir():
        raise OutputError(f"output {out} is not a folder")
    probe = out / f"{TMP_PREFIX}probe-{os.getpid()}"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"lafid")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        why = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputError(f"output folder {out} is not writable: {why}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return out


class OutputLock:
    """An exclusive `fcntl` lock on `_lock` in the output folder, held until `release()`.

    The operating system drops the lock when the process dies, so a crashed run never
    leaves the folder locked."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / LOCK
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputBusy(f"another lafid run (pid {holder}) is writing to {self.path.parent}; "
                             "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def refuse_if_busy(out_dir: str | os.PathLike) -> None:
    """Raise `OutputBusy` now if another run holds `out_dir`'s lock: a second run is refused before it
    spends seconds importing the recipe's stages. The run still takes the lock itself."""
    if (Path(out_dir) / LOCK).is_file():
        OutputLock(out_dir).acquire().release()


def remove_stale_temporaries(out_dir: str | os.PathLike) -> list[str]:
    """Delete `.tmp-*` files a crashed run left; only call while holding the lock."""
    removed = []
    for path in Path(out_dir).glob(f"{TMP_PREFIX}*"):
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    return sorted(removed)


def _tmp(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}")


def write_atomic(table, path: Path) -> None:
    """Write Parquet to a temporary name, then rename: readers never see half a file."""
    tmp = _tmp(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    """Replace a text file as a whole (written, synced, then renamed)."""
    tmp = _tmp(path)
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def append_line(line: str, path: Path) -> None:
    """Append one line and sync it: a crash loses at most this line."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


# --- object storage -------------------------------------------------------------------------

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ID_CHUNK = 1 << 20  # as lafid.video.content_id: size plus the first and last MiB
MANIFEST_NAME = "_manifest.jsonl"
LOGS = ("_curate.log", "_native.log", "_runs.jsonl")


def is_url(path: object) -> bool:
    """`s3://...`, `gs://...`, `file://...`: anything with a scheme."""
    return isinstance(path, str) and bool(_URL.match(path))


def local_path(path: str | os.PathLike) -> str | os.PathLike:
    """A `file://` URL as a plain path; anything else unchanged."""
    if isinstance(path, str) and path.lower().startswith("file://"):
        return urlparse(path).path
    return path


def url_filesystem(url: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `url` and the path inside it. S3 honours `AWS_ENDPOINT_URL_S3` /
    `AWS_ENDPOINT_URL` (passed as `endpoint_override`: pyarrow's S3 client does not read them itself)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme == "s3":
        kwargs = {}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), url.split("://", 1)[1].rstrip("/")
    if scheme == "file":
        return pafs.LocalFileSystem(), urlparse(url).path
    try:
        return pafs.FileSystem.from_uri(url)
    except (ValueError, OSError) as exc:
        raise OutputError(f"cannot use {url}: {exc}") from None


def filesystem(target: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding `target`, a URL or a local path, and the path inside it (local:
    absolute): the one filesystem layer readers of an output go through."""
    if is_url(str(target)):
        return url_filesystem(str(target))
    return pafs.LocalFileSystem(), os.path.abspath(os.fspath(target))


def list_url(url: str, extensions: frozenset[str]) -> list[str]:
    """An object URL as itself; a prefix as every object under it with one of `extensions`, sorted."""
    fs, path = url_filesystem(url)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return [url]  # a file, or missing: the stage gives it its reject reason
    scheme = url.split("://", 1)[0]
    found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(f"{scheme}://{f.path}" for f in found
                  if f.type == pafs.FileType.File and os.path.splitext(f.path)[1].lower() in extensions)


def url_content_id(url: str) -> str:
    """The same id `lafid.video.content_id` gives the same bytes on a local disk."""
    try:
        fs, path = url_filesystem(url)
        with fs.open_input_file(path) as fh:
            size = fh.size()
            digest = hashlib.sha1(str(size).encode())
            digest.update(fh.read(_ID_CHUNK))
            if size > 2 * _ID_CHUNK:
                fh.seek(size - _ID_CHUNK)
                digest.update(fh.read(_ID_CHUNK))
        return digest.hexdigest()[:16]
    except (OSError, OutputError):
        return "path-" + hashlib.sha1(url.encode()).hexdigest()[:11]


def input_cache() -> Path:
    return Path(os.environ.get("LAFID_INPUT_CACHE") or Path(tempfile.gettempdir()) / "lafid-inputs")


def local_copy(url: str) -> str:
    """A local file holding the object at `url`, downloaded once per machine (written under a
    temporary name, then renamed)."""
    name = hashlib.sha1(url.encode()).hexdigest()[:20] + os.path.splitext(urlparse(url).path)[1]
    target = input_cache() / name
    if target.exists():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fs, path = url_filesystem(url)
    tmp = target.with_name(f"{TMP_PREFIX}{os.getpid()}-{name}")
    with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    os.replace(tmp, target)
    return str(target)


def read_json_lines(path: Path) -> list[dict]:
    """The records of a file that `append_line` writes, oldest first ([] when it does not exist); a line
    cut short by a crash is skipped."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def read_manifest(out_dir: str | os.PathLike) -> list[dict]:
    """The entries of an output folder's manifest (`lafid.shards` writes it), one per recorded flush; a
    line cut short by a crash is skipped (its videos are redone)."""
    return read_json_lines(Path(out_dir) / MANIFEST_NAME)


class RemoteOutput:
    """An output folder in object storage, mirrored by a local staging folder.

    `pull()` (under the staging folder's lock) makes the staging folder hold what the
    store holds: the manifest and the shards it names; shards under the prefix that no
    manifest names (left by a run that died between a shard and its manifest) are
    deleted. `push()` uploads every recorded shard not yet in the store under its final
    name, then the manifest, then deletes shards the manifest no longer names."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.prefix = url_filesystem(self.url)
        key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
        self.staging = Path(os.environ.get("LAFID_STAGING") or Path(tempfile.gettempdir()) / "lafid-staging") / key
        self.pushed: set[str] = set()

    def _remote(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _recorded(self) -> set[str]:
        return {f for e in read_manifest(self.staging) for f in e.get("files", ())}

    def pull(self) -> None:
        try:
            self.fs.create_dir(self.prefix)
            listing = self.fs.get_file_info(pafs.FileSelector(self.prefix, recursive=False, allow_not_found=True))
        except OSError as exc:
            raise OutputError(f"output {self.url} cannot be used: {exc}") from None
        remote = {Path(f.path).name for f in listing if f.type == pafs.FileType.File}
        for path in self.staging.iterdir():  # the store is the truth; the lock file stays
            if path.name != LOCK and path.is_file():
                path.unlink()
        for name in (MANIFEST_NAME, *LOGS):
            if name in remote:
                self._download(name)
        recorded = self._recorded()
        for name in sorted(recorded & remote):
            self._download(name)
        for name in sorted(remote - recorded):
            if name.endswith(".parquet") and name.startswith(("clips-", "rejects-")):
                self.fs.delete_file(self._remote(name))
        self.pushed = recorded & remote

    def _download(self, name: str) -> None:
        with self.fs.open_input_stream(self._remote(name)) as src, open(self.staging / name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)

    def _upload(self, name: str) -> None:
        # an object store commits an object when its stream closes: it appears complete or not at all
        with open(self.staging / name, "rb") as src, self.fs.open_output_stream(self._remote(name)) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)

    def push(self, logs: bool = False) -> None:
        recorded = self._recorded()
        for name in sorted(recorded - self.pushed):
            self._upload(name)
        if (self.staging / MANIFEST_NAME).exists():
            self._upload(MANIFEST_NAME)  # last: only now do the new shards count
        for name in sorted(self.pushed - recorded):  # replaced by --retry-failed
            self.fs.delete_file(self._remote(name))
        self.pushed = recorded
        if logs:
            for name in LOGS:
                if (self.staging / name).exists():
                    self._upload(name)


@contextmanager
def open_output(out: str | os.PathLike, logs: bool = False) -> Iterator[tuple[Path, RemoteOutput | None]]:
    """(folder to write into, its object store or None) of an output folder or URL opened for one run
    (`curate`, `export`, `filter`): checked writable and locked for the run's life; an object store is
    written through a local staging folder, pulled into it first and pushed back at the end (with the
    run logs when `logs`). The caller removes stale temporaries (`remove_stale_temporaries`)."""
    out = local_path(out)
    remote = RemoteOutput(str(out)) if is_url(str(out)) else None
    folder = prepare_output(remote.staging if remote else out)
    with OutputLock(folder):
        if remote:
            remote.pull()
        try:
            yield folder, remote
        finally:
            if remote:
                remote.push(logs=logs)
