"""cache.load / cache.save through the backend the settings choose (dir or registry)."""

from __future__ import annotations

from collections.abc import Callable

from layerkeep.build.image import images_to_cache, own_layers_from
from layerkeep.cache.build_records import (
    pull_build_records,
    push_build_records,
    write_records_file,
)
from layerkeep.cache.layers import LoadReport, SaveReport, load_images, save_images
from layerkeep.cache.registry_backend import (
    RegistryLoadReport,
    load_from_registry,
    save_to_registry,
)
from layerkeep.cache.store import CacheDir
from layerkeep.core.engine import Engine
from layerkeep.core.progress import MeterFactory, silent
from layerkeep.core.settings import Settings

Log = Callable[[str], None]


def load_cache(
    engine: Engine, settings: Settings, *, log: Log, progress: MeterFactory = silent
) -> LoadReport:
    """Restore the cached images the engine lacks; ``progress`` shows the bytes read."""
    if settings.cache_backend == "registry":
        loaded = load_from_registry(engine, settings, log=log, progress=progress)
        if not loaded.unreachable:
            pull_build_records(engine, settings, log=log)
        return loaded
    return load_images(engine, CacheDir(settings.cache_dir), log=log, progress=progress)


def save_cache(
    engine: Engine, settings: Settings, *, log: Log, progress: MeterFactory = silent
) -> SaveReport:
    """Save the app image, its stages and LAYERKEEP_CACHE_IMAGES (one `docker save` for
    the changed ones); ``progress`` shows the bytes read from the engine."""
    images = images_to_cache(settings)
    if settings.cache_backend == "registry":
        saved = save_to_registry(engine, settings, images, log=log, progress=progress)
        push_build_records(engine, settings, log=log)
        return saved
    saved = save_images(
        engine,
        CacheDir(settings.cache_dir),
        images,
        level=settings.cache_level,
        threads=settings.cache_threads,
        own_layers_from=own_layers_from(engine, settings),
        log=log,
        progress=progress,
    )
    write_records_file(engine, settings, log=log)
    return saved


def describe_load(report: LoadReport) -> str:
    """A short note on a load, for the ci summary."""
    if isinstance(report, RegistryLoadReport) and report.unreachable:
        return "registry unreachable: cold build"
    if report.cold:
        return "no cache: cold build"
    left = f", {len(report.tags_left)} tag(s) left alone" if report.tags_left else ""
    return (
        f"{len(report.restored)} restored ({report.bytes_read / 1e6:.1f} MB), "
        f"{len(report.present)} present, {len(report.failed)} skipped{left}"
    )
