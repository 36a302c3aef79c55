"""The folder cache's BuildKit part: BuildKit's own cache (``type=local``, ``mode=max``),
staged for each build and committed by cache.save.

Where the engine exports BuildKit's cache (the containerd image store with buildx's
``docker`` driver, or a buildx builder of another driver), the app's layers are kept as
BuildKit keeps them, in ``buildkit/`` of the cache folder: ``blobs/sha256/<hex>`` (the
layers as BuildKit compressed them, its cache config, the cache manifest) and an
``index.json`` naming the cache manifest (:mod:`layerkeep.cache.buildkit_layout`). No
app image is saved or loaded: BuildKit reads from the folder only the blobs the build
needs, and every step's result, of every stage, is there (``mode=max``), whatever the
builds before reused.

A build never writes into the shared folder. It gets a staging folder of its own,
``.staging/<build id>/``, holding hard links to the current blobs and an index naming
the current cache manifest; BuildKit imports from it and exports into it, writing only
the blobs it lacks. cache.save then commits it (:func:`commit`): under the cache's lock
the new blobs are checked against their digests and linked in, ``manifest.json`` (the
cache's one pointer, replaced atomically) names the new cache manifest, and the blobs
it no longer needs are removed: the folder holds exactly one cache, never more. An
interrupted build or save leaves the previous cache whole, and a concurrent job's
staging keeps its own links, so removing a blob never breaks a running build.

A damaged blob (missing, or not its digest: every blob is read when staged, about 1.4
GB/s, and again by :func:`damaged_blobs` if a build fails) is dropped: the cache config
keeps every record but loses the results over that blob, so the build runs again
exactly the steps that made it, and the next commit writes it anew. A damaged blob
that nothing reads would otherwise stay: BuildKit skips writing a blob that exists.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from layerkeep.cache.buildkit_layout import (
    blob_descriptors,
    blob_path,
    cache_metadata,
    check_export,
    content_is,
    exported,
    has_size,
    without_blobs,
    write_index,
)
from layerkeep.cache.layers import read_or_empty
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CorruptCache, unavailable
from layerkeep.core.atomic import TEMP_PREFIX, atomic_write, fsync_folder
from layerkeep.core.log import Log

FOLDER = "buildkit"
STAGINGS = ".staging"
BUILT = "built.json"
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")



@dataclass
class Staging:
    """One build's private copy of the BuildKit cache (see the module's notes)."""

    folder: Path
    # The cache manifest it imports from, or None: a cold build.
    descriptor: dict[str, Any] | None
    dropped: list[str] = field(default_factory=list)
    lock: IO[bytes] | None = field(default=None, repr=False)

    @property
    def cache_from(self) -> tuple[str, ...]:
        """The build's ``--cache-from`` values."""
        return (f"type=local,src={self.folder}",) if self.descriptor else ()

    @property
    def cache_to(self) -> str:
        """The build's ``--cache-to`` value."""
        return f"type=local,dest={self.folder},mode=max"

    def release(self) -> None:
        """Let a later save in another run adopt it, or a sweep remove it."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


@dataclass
class CommitReport:
    """What :func:`commit` did: blobs new to the folder, and what it freed."""

    blobs_written: int = 0
    bytes_written: int = 0
    bytes_freed: int = 0
    blobs: int = 0
    size: int = 0
    unchanged: bool = False


def stage(
    cache: CacheDir, build_id: str, *, app_images: Collection[str] = (), log: Log
) -> Staging:
    """A staging folder for this build, holding the current cache (see module notes).

    Blobs found missing or of the wrong size are dropped (a warning names them) and the
    cache config rewritten without the results over them. ``app_images``: the app's
    images, which a cache saved on the classic image store holds instead.
    """
    shared = cache.root / FOLDER
    stagings = cache.root / STAGINGS
    try:
        with cache.locked():
            manifest = read_or_empty(cache, log)
            stagings.mkdir(exist_ok=True)
            folder, lock = _claim(stagings, build_id)
            try:
                staging = Staging(folder, None, lock=lock)
                if manifest.buildkit:
                    _link_current(shared, staging, manifest.buildkit, log)
                elif set(manifest.images) & set(app_images):
                    log(
                        f"the cache at {cache.root} holds images, which an engine on the "
                        "classic image store saved, but no BuildKit cache export, which "
                        "this engine reads: a cold build (give each image store a cache "
                        "of its own)"
                    )
            except BaseException:
                lock.close()
                raise
    except OSError as error:
        raise unavailable(error, stagings) from None
    return staging


def mark_built(staging: Staging, image_id: str) -> None:
    """Note that the staging now holds the export of the build that made ``image_id``."""
    atomic_write(staging.folder / BUILT, json.dumps({"image": image_id}).encode(), mode=0o644)


def find_built(cache: CacheDir, build_id: str, image_id: str) -> Path | None:
    """The staging a build of ``image_id`` exported into, for a save in a later run."""
    folder = cache.root / STAGINGS / _folder_name(build_id)
    try:
        built = json.loads((folder / BUILT).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return folder if isinstance(built, dict) and built.get("image") == image_id else None


def commit(cache: CacheDir, folder: Path, *, log: Log) -> CommitReport:
    """Make the export in the staging ``folder`` the cache (see module notes)."""
    report = CommitReport()
    descriptor = exported(folder)
    shared = cache.root / FOLDER
    try:
        with cache.locked():
            manifest = read_or_empty(cache, log)
            wanted = blob_descriptors(folder, descriptor)
            new = [
                each for each in wanted
                if not has_size(blob_path(shared, str(each["digest"])), int(each["size"]))
            ]
            for each in new:  # every new blob checked before the first is linked in
                check_export(blob_path(folder, str(each["digest"])), each)
            for each in new:
                digest = str(each["digest"])
                _link(blob_path(folder, digest), blob_path(shared, digest))
            report.blobs, report.blobs_written = len(wanted), len(new)
            report.size = sum(int(each["size"]) for each in wanted)
            report.bytes_written = sum(int(each["size"]) for each in new)
            report.unchanged = manifest.buildkit == descriptor
            if report.blobs_written:
                fsync_folder(blob_path(shared, str(descriptor["digest"])).parent)
            manifest.buildkit = descriptor
            cache.write_manifest(manifest)
            write_index(shared, descriptor)
            keep = {blob_path(shared, str(each["digest"])).name for each in wanted}
            report.bytes_freed = _remove_other_blobs(shared, keep)
            _remove_stagings(cache.root / STAGINGS, folder)
    except OSError as error:
        raise unavailable(error, shared) from None
    return report


def damaged_blobs(staging: Staging) -> list[str]:
    """The digests of the staging's imported blobs whose content is not their digest."""
    if staging.descriptor is None:
        return []
    damaged = []
    for each in blob_descriptors(staging.folder, staging.descriptor, missing_ok=True):
        digest = str(each["digest"])
        if not content_is(blob_path(staging.folder, digest), digest):
            damaged.append(digest)
    return damaged


def drop_blobs(cache: CacheDir, staging: Staging, digests: Iterable[str], *, log: Log) -> None:
    """Remove damaged blobs from the cache and the staging, which then imports the cache
    without the results over them (the next commit writes them again)."""
    gone = list(digests)
    shared = cache.root / FOLDER
    with cache.locked():
        for digest in gone:
            for root in (shared, staging.folder):
                with contextlib.suppress(FileNotFoundError):
                    blob_path(root, digest).unlink()
    if staging.descriptor is not None:
        wanted = blob_descriptors(staging.folder, staging.descriptor, missing_ok=True)
        if set(gone) & cache_metadata(wanted) or len(wanted) == 1:
            staging.descriptor = None  # nothing left to import: a cold build
        else:
            staging.descriptor = without_blobs(staging.folder, staging.descriptor, set(gone))
            write_index(staging.folder, staging.descriptor)
        staging.dropped += gone
    log(
        f"warning: dropped {len(gone)} damaged blob(s) from the BuildKit cache "
        f"({', '.join(d[:19] for d in gone)}): the steps that made them run again"
    )


def describe_commit(report: CommitReport) -> str:
    """The summary note of a commit."""
    if report.unchanged:
        return f"BuildKit cache up to date ({report.size / 1e6:.1f} MB)"
    return (
        f"BuildKit cache: {report.blobs_written} new blob(s), "
        f"{report.bytes_written / 1e6:.1f} MB written, {report.bytes_freed / 1e6:.1f} MB freed "
        f"({report.size / 1e6:.1f} MB in all)"
    )


def _folder_name(build_id: str) -> str:
    return _NOT_IN_NAME.sub("-", build_id).strip(".-")[:80] or "build"


def _claim(stagings: Path, build_id: str) -> tuple[Path, IO[bytes]]:
    """This build's staging folder, emptied, and its lock, held until released: another
    run with the same build id (a twin) gets a numbered one."""
    base = _folder_name(build_id)
    for number in range(1, 100):
        name = base if number == 1 else f"{base}-{number}"
        lock = _try_lock(stagings / f"{name}.lock")
        if lock is None:
            continue
        folder = stagings / name
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "blobs" / "sha256").mkdir(parents=True)
        return folder, lock
    raise OSError(errno.EBUSY, "every staging folder is in use", str(stagings))


def _try_lock(path: Path) -> IO[bytes] | None:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    stream = os.fdopen(descriptor, "r+b")
    try:
        fcntl.flock(stream, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        stream.close()
        return None
    return stream


def _link_current(
    shared: Path, staging: Staging, descriptor: dict[str, Any], log: Log
) -> None:
    """Link the cache's blobs into the staging; drop those missing or damaged."""
    try:
        wanted = blob_descriptors(shared, descriptor)
    except CorruptCache as error:
        log(f"warning: the BuildKit cache is unreadable, building without it: {error.message}")
        return
    damaged: set[str] = set()
    for each in wanted:  # read whole: a blob BuildKit never reads would stay damaged
        digest = str(each["digest"])
        source = blob_path(shared, digest)
        if not (has_size(source, int(each["size"])) and content_is(source, digest)):
            damaged.add(digest)
            continue
        _link(source, blob_path(staging.folder, digest))
    if damaged & cache_metadata(wanted):
        log("warning: the BuildKit cache's own config is damaged, building without it")
        return
    staging.descriptor = descriptor
    if damaged:
        staging.descriptor = without_blobs(staging.folder, descriptor, damaged)
        staging.dropped += sorted(damaged)
        log(
            f"warning: {len(damaged)} blob(s) of the BuildKit cache are missing or damaged "
            f"({', '.join(sorted(d[:19] for d in damaged))}): the steps that made them "
            "run again"
        )
    write_index(staging.folder, staging.descriptor)


def _link(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target`` (atomically); copy across filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        os.link(source, temporary)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copyfile(source, temporary)
    try:
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise



def _remove_other_blobs(shared: Path, keep: set[str]) -> int:
    freed = 0
    folder = shared / "blobs" / "sha256"
    for path in _entries(folder):
        if path.name not in keep:
            with contextlib.suppress(FileNotFoundError):
                freed += path.stat().st_size
                path.unlink()
    return freed


def _remove_stagings(stagings: Path, committed: Path) -> None:
    """Remove the committed staging, and every other one no running build holds."""
    shutil.rmtree(committed, ignore_errors=True)
    for lock_path in _entries(stagings):
        if lock_path.suffix != ".lock":
            continue
        folder = lock_path.with_suffix("")
        if folder == committed:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            continue
        lock = _try_lock(lock_path)
        if lock is None:
            continue  # a running build's
        with lock:
            shutil.rmtree(folder, ignore_errors=True)
            lock_path.unlink(missing_ok=True)


def _entries(folder: Path) -> Iterator[Path]:
    try:
        yield from folder.iterdir()
    except FileNotFoundError:
        return
