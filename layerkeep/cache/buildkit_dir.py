"""The folder cache's BuildKit part: BuildKit's own cache (``type=local``, ``mode=max``).

Where the engine exports BuildKit's cache (the containerd image store with buildx's
``docker`` driver, or a buildx builder of another driver), the app's layers are kept as
BuildKit keeps them, in ``buildkit/`` of the cache folder: ``blobs/sha256/<hex>`` (the
layers as BuildKit compressed them, its cache config, the cache manifest) and an
``index.json`` naming the cache manifest. No app image is saved or loaded: BuildKit
reads from the folder only the blobs the build needs, and every step's result, of every
stage, is there (``mode=max``), whatever the builds before reused.

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
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from layerkeep.cache.store import CacheDir, CorruptCache, Manifest, unavailable
from layerkeep.core.atomic import atomic_write, fsync_folder

Log = Callable[[str], None]
FOLDER = "buildkit"
STAGINGS = ".staging"
BUILT = "built.json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.buildkit.cacheconfig.v0"
_REF_NAME = "org.opencontainers.image.ref.name"
_TAG = "latest"
_DIGEST = re.compile(r"sha256:(?P<hex>[0-9a-f]{64})")
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_CHUNK = 1 << 20


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


def blob_path(root: Path, digest: str) -> Path:
    """Where an OCI layout at ``root`` keeps a blob; CorruptCache for a non-digest name."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise CorruptCache(f"{digest!r} is not a sha256 digest", path=root)
    return root / "blobs" / "sha256" / match["hex"]


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
            manifest = _manifest_or_empty(cache, log)
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
    atomic_write(staging.folder / BUILT, json.dumps({"image": image_id}).encode())


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
    descriptor = _exported(folder)
    shared = cache.root / FOLDER
    try:
        with cache.locked():
            manifest = _manifest_or_empty(cache, log)
            wanted = _blob_descriptors(folder, descriptor)
            new = [
                each for each in wanted
                if not _sized(blob_path(shared, str(each["digest"])), int(each["size"]))
            ]
            for each in new:  # every new blob checked before the first is linked in
                _check_export(blob_path(folder, str(each["digest"])), each)
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
            _write_index(shared, descriptor)
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
    for each in _blob_descriptors(staging.folder, staging.descriptor, missing_ok=True):
        digest = str(each["digest"])
        if not _content_is(blob_path(staging.folder, digest), digest):
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
        wanted = _blob_descriptors(staging.folder, staging.descriptor, missing_ok=True)
        if set(gone) & _metadata(wanted) or len(wanted) == 1:
            staging.descriptor = None  # nothing left to import: a cold build
        else:
            staging.descriptor = without_blobs(staging.folder, staging.descriptor, set(gone))
            _write_index(staging.folder, staging.descriptor)
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


def _manifest_or_empty(cache: CacheDir, log: Log) -> Manifest:
    try:
        return cache.read_manifest()
    except CorruptCache as error:
        log(f"warning: ignoring the cache: {error.message}")
        return Manifest()


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
        wanted = _blob_descriptors(shared, descriptor)
    except CorruptCache as error:
        log(f"warning: the BuildKit cache is unreadable, building without it: {error.message}")
        return
    damaged: set[str] = set()
    for each in wanted:  # read whole: a blob BuildKit never reads would stay damaged
        digest = str(each["digest"])
        source = blob_path(shared, digest)
        if not (_sized(source, int(each["size"])) and _content_is(source, digest)):
            damaged.add(digest)
            continue
        _link(source, blob_path(staging.folder, digest))
    if damaged & _metadata(wanted):
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
    _write_index(staging.folder, staging.descriptor)


def _metadata(descriptors: Iterable[dict[str, Any]]) -> set[str]:
    """The digests of the cache manifest and its config: without them, no cache at all."""
    return {
        str(each["digest"])
        for each in descriptors
        if each.get("mediaType") in (INDEX_TYPE, CONFIG_TYPE)
    }


def _blob_descriptors(
    root: Path, descriptor: dict[str, Any], *, missing_ok: bool = False
) -> list[dict[str, Any]]:
    """The cache manifest's descriptor, then every blob it names (config, layers)."""
    try:
        content = json.loads(blob_path(root, str(descriptor["digest"])).read_bytes())
        listed = content["manifests"]
        if not isinstance(listed, list):
            raise TypeError("manifests is not a list")
        unique = {str(each["digest"]): dict(each) for each in [descriptor, *listed]}
        return list(unique.values())
    except FileNotFoundError:
        if missing_ok:
            return [descriptor]
        raise CorruptCache(
            f"the BuildKit cache manifest {str(descriptor.get('digest'))[:19]} is missing",
            path=root,
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCache(f"the BuildKit cache manifest is damaged ({error})", path=root) from None


def without_blobs(
    root: Path, descriptor: dict[str, Any], damaged: set[str]
) -> dict[str, Any]:
    """A cache manifest like ``descriptor``'s whose config gives no result over a damaged
    blob (or a layer above one); written into ``root``. Returns its descriptor."""
    manifest = json.loads(blob_path(root, str(descriptor["digest"])).read_bytes())
    entries = manifest["manifests"]
    config_entry = next(e for e in entries if e.get("mediaType") == CONFIG_TYPE)
    config = json.loads(blob_path(root, str(config_entry["digest"])).read_bytes())
    layers = config.get("layers") or []
    bad: set[int] = set()
    for index, layer in enumerate(layers):  # parents come first in BuildKit's order
        parent = layer.get("parent", -1)
        if layer.get("blob") in damaged or (isinstance(parent, int) and parent in bad):
            bad.add(index)
    changed = True
    while changed:  # and in any order
        changed = False
        for index, layer in enumerate(layers):
            if index not in bad and layer.get("parent", -1) in bad:
                bad.add(index)
                changed = True
    for record in config.get("records") or []:
        if "layers" in record:
            record["layers"] = [r for r in record["layers"] if r.get("layer") not in bad]
        if "chains" in record:
            record["chains"] = [
                c for c in record["chains"] if not bad & set(c.get("layers") or [])
            ]
    config_entry.update(_write_blob(root, json.dumps(config).encode(), CONFIG_TYPE))
    return {**_write_blob(root, json.dumps(manifest).encode(), INDEX_TYPE)}


def _write_blob(root: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    atomic_write(blob_path(root, digest), data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _write_index(root: Path, descriptor: dict[str, Any]) -> None:
    """The OCI layout's index naming ``descriptor`` (what BuildKit's importer reads)."""
    entry = {**descriptor, "annotations": {_REF_NAME: _TAG}}
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [entry]}
    atomic_write(root / "index.json", json.dumps(index).encode())
    layout = root / "oci-layout"
    if not layout.is_file():
        atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}')


def _exported(folder: Path) -> dict[str, Any]:
    """The descriptor of the cache manifest BuildKit exported into ``folder``."""
    try:
        index = json.loads((folder / "index.json").read_bytes())
        entries = [e for e in index["manifests"] if isinstance(e, dict)]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCache(
            f"BuildKit's export in {folder} has no readable index.json ({error})", path=folder
        ) from None
    tagged = [e for e in entries if (e.get("annotations") or {}).get(_REF_NAME) == _TAG]
    found = (tagged or entries)[-1:] if entries else []
    if not found:
        raise CorruptCache(f"BuildKit's export in {folder} names no cache", path=folder)
    return {key: found[0][key] for key in ("mediaType", "digest", "size") if key in found[0]}


def _check_export(source: Path, descriptor: dict[str, Any]) -> None:
    """A blob BuildKit wrote must be what its descriptor says: else nothing is saved."""
    digest = str(descriptor["digest"])
    if not (_sized(source, int(descriptor["size"])) and _content_is(source, digest)):
        raise CorruptCache(
            f"BuildKit's export wrote {digest[:19]} with other content; the cache was left "
            "as it was",
            path=source,
        )


def _link(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target`` (atomically); copy across filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".tmp-{os.getpid()}-{os.urandom(4).hex()}")
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


def _sized(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _content_is(path: Path, digest: str) -> bool:
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(_CHUNK):
                hasher.update(chunk)
    except OSError:
        return False
    return "sha256:" + hasher.hexdigest() == digest


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
