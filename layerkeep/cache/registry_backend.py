"""LAYERKEEP_CACHE_BACKEND=registry: keep the cache images as tags in a registry.

The cache repository is LAYERKEEP_CACHE_REPOSITORY, by default
``<LAYERKEEP_REGISTRY>/<image repository>-cache``. Tag scheme in it, for an app image
``myorg/app:latest``:

- the app image: its own tag (``latest``);
- each named stage: the tag ``image.build`` gives it (``latest-stage-builder``);
- each LAYERKEEP_CACHE_IMAGES entry: ``extra-<reference as a tag>-<hash>``
  (``postgres:15`` -> ``extra-postgres-15-<10 hex>``), hashed so two images never share one.

``save_to_registry`` pushes them, skipping an image whose cache tag already resolves to
a manifest of the same local image (one registry lookup each, no upload). The engine
keeps the ``<cache repository>:<tag>`` names locally: it only remembers which digest an
image was pushed or pulled as (RepoDigests) while one of its tags in that repository
exists, and that memory is what makes the skip cheap.

``load_from_registry`` pulls them and tags them with the names ``image.build`` looks
for, so they become its ``--cache-from``: BuildKit reads the inline cache they carry,
and the classic builder matches its steps against their history (a pulled image has no
parent chain, and does not need one). A cache tag not there yet is a cold build; an
unreachable registry or refused credentials are a warning, and the build goes on cold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from layerkeep.build.image import images_to_cache, plan_build
from layerkeep.cache.layers import LoadReport, SaveReport
from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError, DockerOperationError
from layerkeep.core.imageref import ImageRef, parse_image_ref
from layerkeep.core.registry import (
    TAG_MAX,
    Credentials,
    RegistryAuthError,
    RegistryUnavailable,
    Sleep,
    TagNotFound,
    credentials_for,
    local_digests,
    path_in_registry,
    pull_tag,
    push_tag,
    registry_host,
    remote_digest,
    safe_tag,
)
from layerkeep.core.settings import Settings

Log = Callable[[str], None]
EXTRA_PREFIX = "extra-"


@dataclass
class RegistryLoadReport(LoadReport):
    """LoadReport's figures, plus the tags the registry lacked and whether it answered."""

    missing: list[str] = field(default_factory=list)
    unreachable: bool = False


@dataclass(frozen=True)
class CacheLocation:
    """Where the cache lives and how we authenticate there."""

    repository: str
    credentials: Credentials


def cache_location(settings: Settings) -> CacheLocation:
    """The cache repository from the settings, checked."""
    if settings.cache_repository:
        repository = settings.cache_repository
        parsed = parse_image_ref(repository)
        if parsed is None or parsed.repository != repository:
            raise ConfigError(
                f"LAYERKEEP_CACHE_REPOSITORY={repository!r} is not a repository",
                key="LAYERKEEP_CACHE_REPOSITORY",
                hint="write host[:port]/path without a tag, e.g. ghcr.io/myorg/app-cache",
            )
    elif settings.registry:
        image = settings.require_image()
        repository = f"{settings.registry}/{path_in_registry(image.repository)}-cache"
    else:
        raise ConfigError(
            "LAYERKEEP_CACHE_BACKEND=registry needs LAYERKEEP_REGISTRY or "
            "LAYERKEEP_CACHE_REPOSITORY",
            key="LAYERKEEP_CACHE_BACKEND",
            hint="set LAYERKEEP_REGISTRY=host[:port], or use LAYERKEEP_CACHE_BACKEND=dir",
        )
    return CacheLocation(repository, credentials_for(settings, registry_host(repository)))


def cache_tags(settings: Settings, images: Sequence[str]) -> dict[str, str]:
    """Local image name -> its tag in the cache repository (see the module's scheme)."""
    built = {str(image): image.tag for image in plan_build(settings).images}
    limit = TAG_MAX - len(EXTRA_PREFIX)
    return {
        image: built.get(image)
        or EXTRA_PREFIX + safe_tag(image, empty_prefix="image", always_hash=True, limit=limit)
        for image in images
    }


def save_to_registry(
    engine: Engine,
    settings: Settings,
    images: Sequence[str],
    *,
    log: Log = print,
    sleep: Sleep = time.sleep,
) -> SaveReport:
    """Push ``images`` (the app, its stages, extras) to the cache repository as cache tags."""
    started = time.monotonic()
    location = cache_location(settings)
    report = SaveReport()
    for image, tag in cache_tags(settings, images).items():
        if engine.image_id(image) is None:
            report.missing.append(image)
            log(f"warning: {image} is not in the engine, so it was not saved")
            continue
        target = ImageRef(location.repository, tag)
        current = remote_digest(
            engine, target, location.credentials,
            attempts=settings.push_retries, time_limit=settings.push_timeout,
            log=log, sleep=sleep,
        )
        engine.tag_image(image, str(target))
        if current is not None and f"{target.repository}@{current}" in local_digests(engine, image):
            report.unchanged.append(image)
            continue
        pushed = push_tag(
            engine, target, location.credentials,
            attempts=settings.push_retries, time_limit=settings.push_timeout,
            log=log, sleep=sleep,
        )
        report.saved.append(image)
        report.layers_written += pushed.layers_pushed
        report.bytes_written += pushed.bytes_pushed
        log(
            f"pushed {image} as {target} ({pushed.layers_pushed} new layer(s), "
            f"{pushed.bytes_pushed / 1e6:.1f} MB, {pushed.seconds:.1f} s)"
        )
    report.seconds = time.monotonic() - started
    if report.skipped:
        log(f"registry cache {location.repository} up to date "
            f"({len(report.unchanged)} images), nothing pushed")
    else:
        log(
            f"saved {len(report.saved)} image(s) to {location.repository}: "
            f"{report.layers_written} new layer(s), {report.bytes_written / 1e6:.1f} MB pushed, "
            f"{len(report.unchanged)} unchanged, {report.seconds:.1f} s"
        )
    return report


def load_from_registry(
    engine: Engine, settings: Settings, *, log: Log = print, sleep: Sleep = time.sleep
) -> RegistryLoadReport:
    """Pull the cache tags and give them the names image.build passes as --cache-from."""
    started = time.monotonic()
    location = cache_location(settings)
    report = RegistryLoadReport()
    for image, tag in cache_tags(settings, images_to_cache(settings)).items():
        source = ImageRef(location.repository, tag)
        try:
            pulled = pull_tag(
                engine, source, location.credentials,
                attempts=settings.push_retries, time_limit=settings.push_timeout,
                log=log, sleep=sleep,
            )
        except TagNotFound:
            report.missing.append(image)
            continue
        except (RegistryUnavailable, RegistryAuthError) as error:
            # The job can still build, only cold: like a damaged dir cache, not a failure.
            report.unreachable = True
            log(f"warning: registry cache not used, building without it: {error.one_line()}")
            break
        except DockerOperationError as error:
            report.failed.append(image)
            log(f"warning: skipped {image}: {error.one_line()}")
            continue
        local = parse_image_ref(image)
        assert local is not None  # every image here passed parse_image_ref in settings/plan
        already = engine.image_id(image) == engine.image_id(str(source))
        engine.tag_image(str(source), str(local))
        if pulled.downloaded or not already:
            report.restored.append(image)
        else:
            report.present.append(image)
        report.bytes_read += pulled.bytes_downloaded
    report.seconds = time.monotonic() - started
    report.cold = report.unreachable or not (report.restored or report.present)
    _log_load(report, location.repository, log)
    return report


def _log_load(report: RegistryLoadReport, repository: str, log: Log) -> None:
    if report.unreachable:
        return
    if report.cold and not report.failed:
        log(f"no cache in {repository} yet: this is a cold build")
        return
    missing = f", {len(report.missing)} not cached yet" if report.missing else ""
    log(
        f"restored {len(report.restored)} image(s) from {repository} "
        f"({report.bytes_read / 1e6:.1f} MB pulled, {report.seconds:.1f} s); "
        f"{len(report.present)} already present{missing}, {len(report.failed)} skipped"
    )
