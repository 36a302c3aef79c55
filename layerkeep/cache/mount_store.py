"""LAYERKEEP_CACHE_MOUNTS: the contents of BuildKit cache mounts, kept in the layerkeep cache.

``save_cache_mounts`` (after the build) copies each cache mount of the Dockerfile out of
the builder (see building.cache_mounts) and keeps it unless the same contents (sha256 of
the tar) are kept already; ``restore_cache_mounts`` (before the build) puts each kept
mount back into the builder, where that mount is still empty.

Where they are kept: the dir backend (:mod:`layerkeep.cache.mount_folder`) or the registry
backend (:mod:`layerkeep.cache.mount_registry`).

LAYERKEEP_CACHE_MOUNTS_MAX bounds what is kept, counted as uncompressed tar bytes: in a
cache folder the mounts saved least recently (written, or found unchanged) go first;
to a registry, a build pushes its mounts until the limit and no more. A mount that
cannot be copied out or in is a warning: the next build only runs colder.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from layerkeep.building.build_plan import plan_build
from layerkeep.building.builder import Builder
from layerkeep.building.cache_mounts import EMPTY_TAR, CacheMount, export_mount, import_mount
from layerkeep.building.cache_mounts import find_cache_mounts as find_in_dockerfile
from layerkeep.cache.mount_folder import CHUNK, MountStore
from layerkeep.cache.mount_registry import MountRegistry, mount_registry
from layerkeep.cache.store_errors import CorruptCache
from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.registry_failures import RegistryAuthError, RegistryUnavailable
from layerkeep.core.settings import Settings
from layerkeep.core.tarstream import chunks_of

SEED_REPOSITORY = "layerkeep-cache-mount-seed"


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


def _begin(
    settings: Settings, builder: Builder, log: Log, *, nothing: str
) -> tuple[MountsReport, list[CacheMount]]:
    """A new report and the mounts to work on; with none, the report says ``nothing``."""
    mounts = cache_mounts(settings, builder, log=log)
    return MountsReport(skipped="" if mounts else nothing), mounts


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
    report, mounts = _begin(settings, builder, log, nothing="nothing to restore")
    if not mounts:
        return report
    registry = mount_registry(engine, settings, log)
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
    report, mounts = _begin(settings, builder, log, nothing="nothing to save")
    if not mounts:
        return report
    registry = mount_registry(engine, settings, log)
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
                    _kept(report, mount, registry.push(mount, path, digest))
                else:
                    written = store.keep(mount, path, digest, size, level=settings.cache_level)
                    _kept(report, mount, size if written else None)
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


@contextlib.contextmanager
def _seed(
    mount: CacheMount, *, engine: Engine, store: MountStore, registry: MountRegistry | None,
    report: MountsReport,
) -> Iterator[str | None]:
    """An image holding the mount's saved files, or None when none was saved."""
    if registry is not None:
        name, pulled = registry.pull(mount) or (None, 0)
        report.bytes += pulled
        yield name
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
            image_id = engine.import_image(
                chunks_of(archive, CHUNK), reference=seed, changes=labels
            )
        try:
            engine.tag_image(image_id, seed)
            yield seed
        finally:
            engine.remove_image(image_id, force=True)


def _kept(report: MountsReport, mount: CacheMount, written: int | None) -> None:
    """Count a mount kept: ``written`` bytes, or None when its contents were kept already."""
    if written is None:
        report.unchanged.append(mount.id)
    else:
        report.saved.append(mount.id)
        report.bytes += written


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
