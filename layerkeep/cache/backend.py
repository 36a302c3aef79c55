"""cache.load, image.build and cache.save through the backend the settings choose (dir
or registry) and the cache the builder keeps: images, or BuildKit's own export.

A builder that exports BuildKit's cache (``Builder.exports_cache``) keeps the app's
layers that way (cache.buildkit_build); the images LAYERKEEP_CACHE_IMAGES names (the
services') are kept as images on every builder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from layerkeep.building.build_plan import images_to_cache, own_layers_from
from layerkeep.building.builder import Builder
from layerkeep.building.image import BuildReport, build_image
from layerkeep.cache.buildkit_build import (
    build_with_buildkit_cache,
    registry_export,
    save_buildkit_cache,
)
from layerkeep.cache.buildkit_dir import CommitReport, describe_commit
from layerkeep.cache.layer_load import LoadReport, cache_sources, load_images
from layerkeep.cache.layer_save import SaveReport, save_images
from layerkeep.cache.record_store import (
    pull_build_records,
    push_build_records,
    write_records_file,
)
from layerkeep.cache.registry_backend import (
    RegistryLoadReport,
    load_from_registry,
    save_to_registry,
)
from layerkeep.cache.scope_marker import mark_saved
from layerkeep.cache.store import CacheDir
from layerkeep.cache.whole_scope import load_whole_scope
from layerkeep.core.engine import Engine
from layerkeep.core.log import Log
from layerkeep.core.progress import MeterFactory, silent
from layerkeep.core.settings import Settings


@dataclass(frozen=True)
class SaveOutcome:
    """What cache.save did: the images it kept, and BuildKit's cache where it keeps that."""

    images: SaveReport
    buildkit: CommitReport | None = None
    # Registry backend: where image.build wrote BuildKit's cache ("" for none).
    pushed_to: str = ""


def load_cache(
    engine: Engine,
    settings: Settings,
    builder: Builder,
    *,
    log: Log,
    progress: MeterFactory = silent,
    environ: Mapping[str, str] | None = None,
) -> LoadReport:
    """Restore the cached images the engine lacks; ``progress`` shows the bytes read.

    ``environ`` reaches the registry (`docker login`'s config) to read the scope's marker.
    """
    images = images_to_cache(settings, app=not builder.exports_cache)
    if settings.cache_backend == "registry":

        def from_registry(chosen: Settings) -> LoadReport:
            loaded = load_from_registry(engine, chosen, images, log=log, progress=progress)
            if not loaded.unreachable:
                pull_build_records(engine, chosen, log=log)
            return loaded

        return load_whole_scope(from_registry, settings, environ or {}, log=log)
    restored = load_images(
        engine, CacheDir(settings.cache_dir), only=images, log=log, progress=progress
    )
    app = set(images_to_cache(settings)) - set(settings.cache_images)
    found = set(restored.restored) | set(restored.present) | set(restored.failed)
    if not builder.exports_cache and restored.buildkit_export and not app & found:
        log(
            "the cache holds a BuildKit cache export, which an engine on the containerd "
            "image store saved, but not the app's images, which this engine reads: a cold "
            "build (give each image store a cache of its own)"
        )
    return restored


def build_with_cache(
    engine: Engine,
    settings: Settings,
    builder: Builder,
    environ: Mapping[str, str],
    *,
    log: Log,
) -> BuildReport:
    """Build the app image from the cache cache.load restored, or from BuildKit's own."""
    if builder.exports_cache:
        return build_with_buildkit_cache(engine, settings, builder, environ, log=log).report
    # Cached images restored under an internal name (a tag of yours named another image).
    internal = cache_sources(engine, images_to_cache(settings))
    return build_image(engine, settings, builder, environ, log=log, also_cache_from=internal)


def save_cache(
    engine: Engine,
    settings: Settings,
    builder: Builder,
    environ: Mapping[str, str],
    *,
    log: Log,
    progress: MeterFactory = silent,
) -> SaveOutcome:
    """Save what the next build needs: the app image, its stages (or BuildKit's cache)
    and LAYERKEEP_CACHE_IMAGES (one `docker save` for the changed ones); ``progress``
    shows the bytes read from the engine."""
    images = images_to_cache(settings, app=not builder.exports_cache)
    buildkit = None
    pushed_to = ""
    if builder.exports_cache:
        buildkit = save_buildkit_cache(engine, settings, builder, environ, log=log)
        pushed_to = registry_export(settings, environ, log=log)
    if settings.cache_backend == "registry":
        saved = save_to_registry(
            engine, settings, images, environ=environ, log=log, progress=progress
        )
        push_build_records(engine, settings, log=log)
        mark_saved(settings, environ, log=log)
        return SaveOutcome(saved, buildkit, pushed_to)
    saved = save_images(
        engine,
        CacheDir(settings.cache_dir),
        images,
        level=settings.cache_level,
        threads=settings.cache_threads,
        own_layers_from=own_layers_from(engine, settings) if not builder.exports_cache else {},
        keep=images_to_cache(settings) if builder.exports_cache else (),
        log=log,
        progress=progress,
    )
    write_records_file(engine, settings, log=log)
    return SaveOutcome(saved, buildkit, pushed_to)


def describe_save(outcome: SaveOutcome) -> str:
    """A short note on a save, for the summary."""
    report = outcome.images
    parts = []
    if outcome.buildkit is not None:
        parts.append(describe_commit(outcome.buildkit))
    if outcome.pushed_to:
        parts.append(f"BuildKit cache in {outcome.pushed_to}, written by image.build")
    if report.saved or report.dropped or not parts:
        parts.append(
            "up to date"
            if report.skipped
            else f"{report.layers_written} layers, {report.bytes_written / 1e6:.1f} MB written"
        )
    if report.uncovered:
        parts.append(f"inline cache incomplete for {', '.join(report.uncovered)}")
    return "; ".join(parts)


def describe_load(report: LoadReport, builder: Builder) -> str:
    """A short note on a load, for the ci summary."""
    if isinstance(report, RegistryLoadReport) and report.unreachable:
        return "registry unreachable: cold build"
    if builder.exports_cache and not (report.restored or report.present or report.failed):
        return "the app's cache is BuildKit's: image.build reads it"
    if report.cold:
        return "no cache: cold build"
    left = f", {len(report.tags_left)} tag(s) left alone" if report.tags_left else ""
    return (
        f"{len(report.restored)} restored ({report.bytes_read / 1e6:.1f} MB), "
        f"{len(report.present)} present, {len(report.failed)} skipped{left}"
    )
