"""LAYERKEEP_CACHE_MOUNTS: the contents of BuildKit cache mounts, kept in the layerkeep cache.

``save_cache_mounts`` (after the build) copies each cache mount of the Dockerfile out of
the builder (see building.cache_mounts) and keeps it unless the same contents (sha256 of
the tar) are kept already; ``restore_cache_mounts`` (before the build) puts each kept
mount back into the builder, where that mount is still empty.

- dir backend: ``mounts/`` in LAYERKEEP_CACHE_DIR, an ``index.json`` and one
  ``<sha256>.tar.zst`` per mount, each written to a temporary name, fsynced and renamed
  under the cache folder's lock, the index last.
- registry backend: one image per mount beside the cache tags, in the branch's scope
  like them (``<cache repository>:<scope>--<app tag>-mount-<id as a tag>-<hash>``, read
  from the own scope, else the fallback branch's; a read-only build saves none); its
  one layer is the mount's files (the engine compresses it for the push), its label
  their digest. The engine keeps that tag, which is how an unchanged mount costs one
  registry lookup.

LAYERKEEP_CACHE_MOUNTS_MAX bounds what is kept, counted as uncompressed tar bytes: in a
cache folder the mounts saved least recently (written, or found unchanged) go first;
to a registry, a build pushes its mounts until the limit and no more. A mount that
cannot be copied out or in is a warning: the next build only runs colder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import zstandard

from layerkeep.building.cache_mounts import EMPTY_TAR, CacheMount, export_mount, import_mount
from layerkeep.building.cache_mounts import find_cache_mounts as find_in_dockerfile
from layerkeep.building.image import Builder, plan_build
from layerkeep.cache.registry_backend import (
    CacheLocation,
    CacheScope,
    cache_location,
    cache_scope,
)
from layerkeep.cache.store import TEMP_PREFIX, CacheDir, CorruptCache, unavailable
from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError, ResourceConflict
from layerkeep.core.imageref import ImageRef
from layerkeep.core.registry import local_digests, pull_tag, push_tag, remote_digest
from layerkeep.core.registry_failures import (
    RegistryAuthError,
    RegistryUnavailable,
    Retries,
    TagNotFound,
)
from layerkeep.core.settings import Settings
from layerkeep.core.tag_names import TAG_MAX, safe_tag

Log = Callable[[str], None]
FOLDER = "mounts"
INDEX = "index.json"
FORMAT = "layerkeep-cache-mounts/1"
_HEX = re.compile(r"[0-9a-f]{64}")
DIGEST_LABEL = "io.layerkeep.cache-mount.digest"
SEED_REPOSITORY = "layerkeep-cache-mount-seed"
CHUNK = 1 << 20


@dataclass
class MountsReport:
    """What a save or restore did, by cache mount id."""

    restored: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    skipped: str = ""


def cache_mounts(settings: Settings, builder: Builder, *, log: Log) -> list[CacheMount]:
    """The Dockerfile's cache mounts to keep; none (with a line why) when there is nothing
    to do: LAYERKEEP_CACHE_MOUNTS=no, the classic builder, or no cache mount."""
    if not settings.cache_mounts:
        return []
    found = find_in_dockerfile(
        plan_build(settings).dockerfile.read_text("utf-8"), settings.build_args
    )
    if found.mounts and builder.kind != "buildkit":
        log(
            f"cache mounts: the classic builder has none (it ignores RUN --mount), so "
            f"{len(found.mounts)} cache mount(s) are not kept; build with BuildKit to keep them"
        )
        return []
    for note in found.notes:
        log(f"cache mounts: {note}")
    return list(found.mounts)


def restore_cache_mounts(
    engine: Engine,
    settings: Settings,
    builder: Builder,
    environ: Mapping[str, str],
    *,
    log: Log = print,
) -> MountsReport:
    """Put the kept contents of the Dockerfile's cache mounts into the builder (before a build).

    ``environ`` reaches the same engine as ``engine`` (DOCKER_HOST, DOCKER_CONFIG).
    """
    started = time.monotonic()
    report = MountsReport()
    mounts = cache_mounts(settings, builder, log=log)
    if not mounts:
        report.skipped = "nothing to restore"
        return report
    registry = _registry(engine, settings, log)
    store = MountStore(settings.cache_dir)
    for mount in mounts:
        try:
            with _seed(
                mount, engine=engine, store=store, registry=registry, report=report
            ) as seed:
                if seed is None:
                    report.missing.append(mount.id)
                    continue
                if import_mount(builder.cli, environ, mount, seed):
                    report.restored.append(mount.id)
                else:
                    report.kept.append(mount.id)
        except (RegistryUnavailable, RegistryAuthError) as error:
            log(f"warning: cache mounts not restored, the build runs without them: "
                f"{error.one_line()}")
            report.failed.append(mount.id)
            break
        except (DockerOperationError, CorruptCache) as error:
            report.failed.append(mount.id)
            log(f"warning: cache mount {mount.id} not restored: {error.one_line()}")
    report.seconds = time.monotonic() - started
    log(
        f"cache mounts: {len(report.restored)} restored ({report.bytes / 1e6:.1f} MB, "
        f"{report.seconds:.1f} s), {len(report.kept)} already in the builder, "
        f"{len(report.missing)} not saved yet, {len(report.failed)} failed"
    )
    return report


def save_cache_mounts(
    engine: Engine,
    settings: Settings,
    builder: Builder,
    environ: Mapping[str, str],
    *,
    log: Log = print,
) -> MountsReport:
    """Keep the contents of the Dockerfile's cache mounts (after a build), unless unchanged."""
    started = time.monotonic()
    report = MountsReport()
    mounts = cache_mounts(settings, builder, log=log)
    if not mounts:
        report.skipped = "nothing to save"
        return report
    registry = _registry(engine, settings, log)
    if registry is not None and registry.scope.read_only:
        report.skipped = f"not saved, the registry cache is read-only: {registry.scope.read_only}"
        log(f"cache mounts: {report.skipped}")
        return report
    store = MountStore(settings.cache_dir)
    pushed = 0
    with tempfile.TemporaryDirectory(prefix="layerkeep-mount-") as folder:
        for mount in mounts:
            path = Path(folder) / "mount.tar"
            try:
                with path.open("wb") as output:
                    digest, size = export_mount(builder.cli, environ, mount, output)
                if size <= EMPTY_TAR:
                    log(f"cache mount {mount.id} is empty: nothing to keep")
                elif size + pushed > settings.cache_mounts_max:
                    report.dropped.append(mount.id)
                    log(f"cache mount {mount.id} ({size / 1e6:.1f} MB) not kept: past "
                        f"LAYERKEEP_CACHE_MOUNTS_MAX ({settings.cache_mounts_max / 1e6:.0f} MB)")
                elif registry is not None:
                    # Pushed ones count against the limit: the registry drops nothing.
                    pushed += size
                    registry.push(mount, path, digest, report)
                elif store.keep(mount, path, digest, size, level=settings.cache_level):
                    report.saved.append(mount.id)
                    report.bytes += size
                else:
                    report.unchanged.append(mount.id)
            except DockerOperationError as error:
                report.failed.append(mount.id)
                log(f"warning: cache mount {mount.id} not saved: {error.one_line()}")
            finally:
                path.unlink(missing_ok=True)
    if registry is None:
        for dropped in store.evict(settings.cache_mounts_max):
            log(f"cache mounts: dropped {dropped}, saved least recently, to stay within "
                "LAYERKEEP_CACHE_MOUNTS_MAX")
            report.dropped.append(dropped)
    report.seconds = time.monotonic() - started
    log(
        f"cache mounts: {len(report.saved)} saved ({report.bytes / 1e6:.1f} MB, "
        f"{report.seconds:.1f} s), {len(report.unchanged)} unchanged, "
        f"{len(report.dropped)} dropped, {len(report.failed)} failed"
    )
    return report


# --- the registry backend --------------------------------------------------------------


def _registry(engine: Engine, settings: Settings, log: Log) -> _Registry | None:
    if settings.cache_backend != "registry":
        return None
    return _Registry(engine, settings, cache_location(settings), cache_scope(settings), log)


def mount_tag(settings: Settings, mount: CacheMount) -> str:
    """The tag of a mount's image in the cache repository, beside the app's cache tags."""
    prefix = f"{settings.require_image().tag}-mount-"
    return prefix + safe_tag(
        mount.key, empty_prefix="mount", always_hash=True, limit=TAG_MAX - len(prefix)
    )


@dataclass(frozen=True)
class _Registry:
    """The cache repository, reached through the engine with the settings' retries."""

    engine: Engine
    settings: Settings
    location: CacheLocation
    scope: CacheScope
    log: Log

    def reference(self, mount: CacheMount) -> ImageRef:
        """Where this build saves the mount: its tag in the branch's own scope."""
        return ImageRef(self.location.repository, self.scope.tag(mount_tag(self.settings, mount)))

    def push(self, mount: CacheMount, path: Path, digest: str, report: MountsReport) -> None:
        """Push the mount's tar as an image, unless the registry holds these contents."""
        engine, target = self.engine, self.reference(mount)
        old = engine.image_attrs(str(target))
        labels = ((old or {}).get("Config") or {}).get("Labels") or {}
        if old is not None and labels.get(DIGEST_LABEL) == digest:
            current = remote_digest(
                engine, target, self.location.credentials, Retries.of(self.settings, self.log)
            )
            if current is not None and f"{target.repository}@{current}" in local_digests(
                engine, str(target)
            ):
                report.unchanged.append(mount.id)
                return
        with path.open("rb") as archive:
            image_id = engine.import_image(
                _chunks(archive), reference=str(target),
                changes=[f"LABEL {DIGEST_LABEL}={digest}"],
            )
        engine.tag_image(image_id, str(target))
        if old is not None and old["Id"] != image_id:
            with contextlib.suppress(ResourceConflict):
                engine.remove_image(str(old["Id"]))
        pushed = push_tag(
            engine, target, self.location.credentials, Retries.of(self.settings, self.log)
        )
        report.saved.append(mount.id)
        report.bytes += pushed.bytes_pushed
        self.log(f"pushed cache mount {mount.id} as {target} "
                 f"({pushed.bytes_pushed / 1e6:.1f} MB, {pushed.seconds:.1f} s)")

    def pull(self, mount: CacheMount, report: MountsReport) -> str | None:
        """Pull the mount's image from the own scope, else the fallback branch's; its name,
        or None when neither has it."""
        for tag in self.scope.sources(mount_tag(self.settings, mount)):
            source = ImageRef(self.location.repository, tag)
            try:
                pulled = pull_tag(
                    self.engine, source, self.location.credentials,
                    Retries.of(self.settings, self.log),
                )
            except TagNotFound:
                continue
            report.bytes += pulled.bytes_downloaded
            return str(source)
        return None


@contextlib.contextmanager
def _seed(
    mount: CacheMount, *, engine: Engine, store: MountStore, registry: _Registry | None,
    report: MountsReport,
) -> Iterator[str | None]:
    """An image holding the mount's saved files, or None when none was saved."""
    if registry is not None:
        yield registry.pull(mount, report)
        return
    with tempfile.TemporaryDirectory(prefix="layerkeep-mount-") as folder:
        path = Path(folder) / "mount.tar"
        size = store.unpack(mount, path)
        if size is None:
            yield None
            return
        report.bytes += size
        seed = f"{SEED_REPOSITORY}:{os.urandom(6).hex()}"
        # The job's labels, so that a sweep removes a seed a killed run left behind.
        labels = [f"LABEL {json.dumps(k)}={json.dumps(v)}" for k, v in engine.labels.items()]
        with path.open("rb") as archive:
            image_id = engine.import_image(_chunks(archive), reference=seed, changes=labels)
        try:
            engine.tag_image(image_id, seed)
            yield seed
        finally:
            engine.remove_image(image_id, force=True)


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


# --- the dir backend --------------------------------------------------------------------


@dataclass(frozen=True)
class KeptMount:
    """One mount in the cache folder: its file, its content's digest and size, when saved."""

    id: str
    file: str
    digest: str
    size: int
    saved: float


@dataclass(frozen=True)
class MountStore:
    """``mounts/`` in a cache folder (see the module's notes)."""

    cache_dir: Path

    @property
    def folder(self) -> Path:
        """Where the index and the archives live."""
        return self.cache_dir / FOLDER

    def read_index(self) -> dict[str, KeptMount]:
        """Mount key -> what is kept; empty when nothing was saved, CorruptCache if damaged."""
        path = self.folder / INDEX
        try:
            data = json.loads(path.read_text("utf-8"))
            if data.get("format") != FORMAT:
                raise CorruptCache(f"{path} is not a {FORMAT} index", path=path)
            index = {str(key): KeptMount(**entry) for key, entry in data["mounts"].items()}
            for kept in index.values():
                if kept.file != archive_name(kept.digest):
                    # Joined to the folder: any other name would read or remove elsewhere.
                    raise ValueError(f"{kept.file!r} is not the archive of {kept.digest!r}")
            return index
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptCache(f"{path} is damaged ({error})", path=path) from None

    def keep(self, mount: CacheMount, tar: Path, digest: str, size: int, *, level: int) -> bool:
        """Store the mount's tar unless the same contents are kept; whether it was written."""
        with CacheDir(self.cache_dir).locked():
            index = self._index_or_empty()
            old = index.get(mount.key)
            written = old is None or old.digest != digest or not (self.folder / old.file).is_file()
            file = old.file if old is not None and not written else archive_name(digest)
            if written:
                self._compress(tar, self.folder / file, level)
            index[mount.key] = KeptMount(mount.id, file, digest, size, time.time())
            self._write_index(index)
        return written

    def unpack(self, mount: CacheMount, tar: Path) -> int | None:
        """Write the kept tar of ``mount`` to ``tar``; its size, or None when none is kept.

        A damaged archive is dropped from the index (the next save writes it again) and
        raised as CorruptCache.
        """
        with CacheDir(self.cache_dir).locked(write=False):
            kept = self._index_or_empty().get(mount.key)
            if kept is None:
                return None
            path = self.folder / kept.file
            digest = hashlib.sha256()
            size = 0
            try:
                with path.open("rb") as raw, tar.open("wb") as output:
                    reader = zstandard.ZstdDecompressor().stream_reader(raw)
                    while chunk := reader.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        output.write(chunk)
                sound = f"sha256:{digest.hexdigest()}" == kept.digest and size == kept.size
                problem = "its content does not match its digest"
            except (OSError, zstandard.ZstdError) as error:
                sound, problem = False, str(error)
        if not sound:
            self._forget(mount.key)
            raise CorruptCache(f"{path} is damaged: {problem}", path=path)
        return size

    def evict(self, limit: int) -> list[str]:
        """Drop the mounts saved least recently until the rest fit in ``limit``; their ids."""
        with CacheDir(self.cache_dir).locked():
            index = self._index_or_empty()
            total, dropped = 0, []
            for key, kept in sorted(index.items(), key=lambda item: -item[1].saved):
                total += kept.size
                if total > limit:
                    dropped.append(key)
            for key in dropped:
                (self.folder / index.pop(key).file).unlink(missing_ok=True)
            if dropped:
                self._write_index(index)
            self._remove_strays(index)
        return [key.split(",")[0] for key in dropped]

    def _index_or_empty(self) -> dict[str, KeptMount]:
        try:
            return self.read_index()
        except CorruptCache:
            return {}  # rewritten whole by this save; the archives it named are strays

    def _forget(self, key: str) -> None:
        with CacheDir(self.cache_dir).locked():
            index = self._index_or_empty()
            if index.pop(key, None) is not None:
                self._write_index(index)

    def _compress(self, tar: Path, target: Path, level: int) -> None:
        compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
        with self._atomic(target) as raw, tar.open("rb") as source:
            compressor.copy_stream(source, raw, read_size=CHUNK, write_size=CHUNK)

    def _write_index(self, index: dict[str, KeptMount]) -> None:
        data = {
            "format": FORMAT,
            "mounts": {key: kept.__dict__ for key, kept in sorted(index.items())},
        }
        with self._atomic(self.folder / INDEX) as stream:
            stream.write(json.dumps(data, indent=1).encode())

    def _remove_strays(self, index: dict[str, KeptMount]) -> None:
        """Archives no entry names and temporary files an interrupted save left."""
        keep = {kept.file for kept in index.values()} | {INDEX}
        try:
            for path in self.folder.iterdir() if self.folder.is_dir() else ():
                if path.name not in keep and path.is_file():
                    path.unlink()
        except OSError as error:
            raise unavailable(error, self.folder) from None

    @contextlib.contextmanager
    def _atomic(self, target: Path) -> Iterator[IO[bytes]]:
        temp = target.parent / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with temp.open("xb") as stream:
                yield stream
                stream.flush()
                os.fsync(stream.fileno())
            temp.replace(target)
            descriptor = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as error:
            raise unavailable(error, target) from None
        finally:
            temp.unlink(missing_ok=True)


def archive_name(digest: str) -> str:
    """The file a mount's archive is kept in: its content's digest; ValueError for a
    digest that is not sha256."""
    if not digest.startswith("sha256:") or not _HEX.fullmatch(digest[7:]):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return f"{digest[7:]}.tar.zst"


def describe_mounts(report: MountsReport) -> str:
    """A short note on a save or restore of cache mounts, for the task's summary."""
    if report.skipped:
        return f"cache mounts: {report.skipped}"
    done = [
        f"{len(items)} {word}"
        for items, word in (
            (report.restored, "restored"), (report.kept, "already in the builder"),
            (report.missing, "not saved yet"), (report.saved, "saved"),
            (report.unchanged, "unchanged"), (report.dropped, "dropped"),
            (report.failed, "failed"),
        )
        if items
    ]
    return f"cache mounts: {', '.join(done) or 'none'} ({report.bytes / 1e6:.1f} MB)"
