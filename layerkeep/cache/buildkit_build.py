"""Build with BuildKit's own cache, where the builder exports it (``Builder.exports_cache``).

- dir backend: the build imports from and exports into a staging folder of the cache
  (see cache.buildkit_dir); cache.save commits it.
- registry backend: BuildKit reads ``<cache repository>:<scope>--buildcache`` of this
  branch and of the fallback branch, and writes this branch's (``mode=max``) unless the
  cache is read-only here; the same scopes and rules as the image tags (see
  cache.registry_backend).

The cache never fails the build: a damaged blob of the folder cache is dropped and the
build run again once; a cache export that fails (a full disk, a registry that went
away) is a warning, and the build runs again without exporting, every step then coming
from the engine's own build cache.
"""

from __future__ import annotations

import contextlib
import functools
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from layerkeep.building.build_plan import images_to_cache, plan_build
from layerkeep.building.builder import Builder
from layerkeep.building.cli_config import docker_config_with
from layerkeep.building.image import BuildReport, CacheExport, build_image
from layerkeep.building.target_build import CacheExportFailed
from layerkeep.cache.buildkit_dir import (
    CommitReport,
    commit,
    damaged_blobs,
    drop_blobs,
    find_built,
    mark_built,
    stage,
)
from layerkeep.cache.registry_backend import CacheLocation, cache_location, cache_scope
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CacheError
from layerkeep.core.engine import Engine
from layerkeep.core.errors import BuildFailed
from layerkeep.core.log import Log
from layerkeep.core.registry_api import RegistryClient
from layerkeep.core.registry_credentials import path_in_registry
from layerkeep.core.registry_failures import RegistryAuthError, RegistryUnavailable
from layerkeep.core.settings import Settings

REGISTRY_TAG = "buildcache"
# How registries word a refused layer or manifest type.
_REFUSED_LAYERS = re.compile(r"media.?type|manifest.?invalid|unsupported|zstd", re.IGNORECASE)


@dataclass(frozen=True)
class ExportedBuild:
    """A build with BuildKit's cache, and where its export went."""

    report: BuildReport
    # dir backend: the staging folder holding the export, for cache.save to commit.
    staging: Path | None = None
    # registry backend: the reference written ("" when nothing was).
    pushed_to: str = ""


def build_with_buildkit_cache(
    engine: Engine, settings: Settings, builder: Builder, environ: Mapping[str, str], *, log: Log
) -> ExportedBuild:
    """Build the app image importing and exporting BuildKit's cache (see module notes)."""
    if settings.cache_backend == "registry":
        return _build_with_registry_cache(engine, settings, builder, environ, log=log)
    build = functools.partial(build_image, engine, settings, builder, environ, log=log)
    cache = CacheDir(settings.cache_dir)
    try:
        staging = stage(
            cache, settings.build_id, app_images=images_to_cache(settings, app=True), log=log
        )
    except CacheError as error:
        log(f"warning: the cache folder cannot take BuildKit's cache: {error.one_line()}")
        return ExportedBuild(build(export=CacheExport((), None)))
    try:
        for attempt in range(2):
            export = CacheExport(staging.cache_from, staging.cache_to)
            try:
                report = build(export=export)
            except CacheExportFailed as error:
                log(f"warning: BuildKit could not export its cache: {error.message}")
                report = build(export=replace_to(export))
                return ExportedBuild(report)
            except BuildFailed:
                damaged = damaged_blobs(staging) if attempt == 0 else []
                if not damaged:
                    raise
                drop_blobs(cache, staging, damaged, log=log)
                continue
            image_id = engine.image_id(str(report.images[-1]))
            if image_id is not None:
                mark_built(staging, image_id)
            return ExportedBuild(report, staging.folder)
        raise AssertionError("unreachable: the second attempt returns or raises")
    finally:
        staging.release()


def save_buildkit_cache(
    engine: Engine, settings: Settings, builder: Builder, environ: Mapping[str, str], *, log: Log
) -> CommitReport | None:
    """cache.save's part for BuildKit's cache: commit the build's export (dir backend).

    A save in a run whose build exported nothing for the current image (run apart from
    image.build) exports it first, with a build the engine's own cache answers. The
    registry backend was written by the build itself: None.
    """
    if settings.cache_backend == "registry":
        return None
    cache = CacheDir(settings.cache_dir)
    image = str(plan_build(settings).images[-1])
    image_id = engine.image_id(image)
    folder = find_built(cache, settings.build_id, image_id) if image_id else None
    if folder is None:
        log(f"no BuildKit cache export of {image} from this build yet: exporting it")
        folder = build_with_buildkit_cache(engine, settings, builder, environ, log=log).staging
        if folder is None:
            return None
    report = commit(cache, folder, log=log)
    log(
        f"BuildKit cache saved to {cache.root}: {report.blobs_written} new blob(s) "
        f"({report.bytes_written / 1e6:.1f} MB), {report.bytes_freed / 1e6:.1f} MB freed, "
        f"{report.size / 1e6:.1f} MB in all"
    )
    return report


def _saved_sources(
    location: CacheLocation,
    tags: Sequence[str],
    settings: Settings,
    environ: Mapping[str, str],
    log: Log,
) -> list[str]:
    """The references among ``tags`` the cache repository has (BuildKit would only warn
    about the others): the branch's own scope first, else the fallback's."""
    repository = path_in_registry(location.repository)
    try:
        with RegistryClient(
            location.credentials, environ=environ, timeout=settings.docker_timeout
        ) as client:
            for tag in tags:
                if client.manifest_digest(repository, tag) is not None:
                    return [f"{location.repository}:{tag}"]
    except (RegistryUnavailable, RegistryAuthError) as error:
        log(f"warning: registry cache not used, building without it: {error.one_line()}")
        return []
    log(f"no BuildKit cache in {location.repository} ({', '.join(tags)}) yet: a cold build")
    return []


def registry_export(settings: Settings, environ: Mapping[str, str], *, log: Log) -> str:
    """Where the build wrote BuildKit's cache in the registry, checked there; "" for the
    folder backend, where the registry cache is read-only, and when it is not there."""
    if settings.cache_backend != "registry":
        return ""
    scope = cache_scope(settings)
    location = cache_location(settings)
    if scope.read_only:
        return ""
    tag = scope.tag(REGISTRY_TAG)
    target = f"{location.repository}:{tag}"
    try:
        with RegistryClient(
            location.credentials, environ=environ, timeout=settings.docker_timeout
        ) as client:
            found = client.manifest_digest(path_in_registry(location.repository), tag)
    except (RegistryUnavailable, RegistryAuthError) as error:
        log(f"warning: cannot check BuildKit's cache at {target}: {error.one_line()}")
        return ""
    if found is None:
        log(f"warning: no BuildKit cache at {target}: the build did not export it")
        return ""
    return target


def zstd_refused_hint(settings: Settings, message: str) -> str:
    """The way out when a registry seems to refuse zstd layers (older ones do), or ""."""
    if settings.layer_compression != "zstd" or not _REFUSED_LAYERS.search(message):
        return ""
    return " (if the registry refuses zstd layers, set LAYERKEEP_LAYER_COMPRESSION=gzip)"


def replace_to(export: CacheExport) -> CacheExport:
    """``export`` without its ``--cache-to``: the build again, exporting nothing."""
    return CacheExport(export.cache_from, None, export.environ)


def _build_with_registry_cache(
    engine: Engine, settings: Settings, builder: Builder, environ: Mapping[str, str], *, log: Log
) -> ExportedBuild:
    location = cache_location(settings)
    scope = cache_scope(settings)
    sources = _saved_sources(location, scope.sources(REGISTRY_TAG), settings, environ, log)
    target = f"{location.repository}:{scope.tag(REGISTRY_TAG)}"
    if scope.read_only:
        log(f"registry cache {location.repository} is read-only here ({scope.read_only}): "
            "BuildKit's cache is read, not written")
    cache_to = None if scope.read_only else f"type=registry,ref={target},mode=max"
    build = functools.partial(build_image, engine, settings, builder, environ, log=log)
    with contextlib.ExitStack() as stack:
        extra: dict[str, str] = {}
        if location.credentials.user:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="layerkeep-")))
            extra = docker_config_with(
                {location.credentials.registry: location.credentials}, environ,
                folder / "docker-config",
            )
        export = CacheExport(tuple(f"type=registry,ref={s}" for s in sources), cache_to, extra)
        try:
            report = build(export=export)
        except CacheExportFailed as error:
            log(
                f"warning: BuildKit could not write its cache to {target}: {error.message}; "
                f"the job goes on without it{zstd_refused_hint(settings, error.message)}"
            )
            return ExportedBuild(build(export=replace_to(export)))
    return ExportedBuild(report, pushed_to=target if cache_to else "")
