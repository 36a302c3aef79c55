"""LAYERKEEP_CACHE_BACKEND=registry: keep the cache images as tags in a registry.

The cache repository is LAYERKEEP_CACHE_REPOSITORY, by default
``<LAYERKEEP_REGISTRY>/<image repository>-cache``. Tag scheme in it, for an app image
``myorg/app:latest``:

- the app image: its own tag (``latest``);
- each named stage: the tag ``image.build`` gives it (``latest-stage-builder``);
- each LAYERKEEP_CACHE_IMAGES entry: ``extra-<reference as a tag>-<hash>``
  (``postgres:15`` -> ``extra-postgres-15-<10 hex>``), hashed so two images never share one.

Branch scope: each of those tags is kept per branch, as ``<scope>--<tag>``
(``main--latest``, ``feature-login-<10 hex>--latest-stage-deps``), where the scope is the
branch's name when that is a valid tag of at most 48 characters without ``--`` and not
ending in ``-``, else :func:`~layerkeep.core.tag_names.safe_tag`'s hashed form; so the
first ``--`` ends the scope, and two branches never share a tag. A build saves under its
branch's scope (LAYERKEEP_BRANCH; an unknown branch counts as the fallback branch) and
loads each image from there or, where that scope has no such tag yet, from the scope of
LAYERKEEP_CACHE_FALLBACK_BRANCH (its default comes from the CI, else ``main``). Saves are
skipped when LAYERKEEP_CACHE_READ_ONLY says so (``yes``; ``auto`` on pull requests), and
always for a pull request whose branch is named like the fallback branch (a fork's
``main``): the default branch's cache is never written by a pull request.

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

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerkeep.building.build_plan import plan_build
from layerkeep.building.inline_cache import complete
from layerkeep.cache.archive import image_id_of
from layerkeep.cache.layer_load import LoadReport
from layerkeep.cache.layer_save import SaveReport, unchanged
from layerkeep.cache.manifest import CachedImage, config_layers
from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError, DockerOperationError
from layerkeep.core.imageref import ImageRef, parse_image_ref
from layerkeep.core.log import Log
from layerkeep.core.progress import MeterFactory, silent
from layerkeep.core.registry import Pulled, pull_tag, push_tag
from layerkeep.core.registry_api import RegistryClient
from layerkeep.core.registry_credentials import (
    Credentials,
    credentials_for,
    path_in_registry,
    registry_host,
)
from layerkeep.core.registry_failures import (
    RegistryAuthError,
    RegistryUnavailable,
    Retries,
    Sleep,
    TagNotFound,
)
from layerkeep.core.settings import Settings
from layerkeep.core.tag_names import TAG_MAX, safe_tag

EXTRA_PREFIX = "extra-"


@dataclass
class RegistryLoadReport(LoadReport):
    """LoadReport's figures, plus the tags the registry lacked and whether it answered."""

    missing: list[str] = field(default_factory=list)
    unreachable: bool = False
    from_fallback: list[str] = field(default_factory=list)


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


def registry_cache(settings: Settings) -> str | None:
    """The registry cache's repository (image.build reads cached images from there on
    the containerd store), or None with the folder backend."""
    return cache_location(settings).repository if settings.cache_backend == "registry" else None


SCOPE_SEPARATOR = "--"
SCOPE_MAX = 48


def scope_name(branch: str) -> str:
    """The scope of ``branch`` in cache tags: no ``--`` inside, none made by a trailing ``-``."""
    odd = SCOPE_SEPARATOR in branch or branch.endswith("-")
    return safe_tag(branch, always_hash=odd, limit=SCOPE_MAX)


def scoped_tag(scope: str, tag: str) -> str:
    """``<scope>--<tag>``, the tag shortened (and hashed) when the whole would be too long."""
    room = TAG_MAX - len(scope) - len(SCOPE_SEPARATOR)
    if len(tag) > room:
        tag = safe_tag(tag, always_hash=True, limit=room)
    return f"{scope}{SCOPE_SEPARATOR}{tag}"


@dataclass(frozen=True)
class CacheScope:
    """The branch scopes a build reads from and saves to (see the module's notes)."""

    branch: str
    fallback_branch: str
    # Why a save pushes nothing; "" when it pushes.
    read_only: str = ""

    @property
    def own(self) -> str:
        """The scope this build saves to and reads first."""
        return scope_name(self.branch)

    @property
    def fallback(self) -> str:
        """The scope read where the own scope lacks a tag."""
        return scope_name(self.fallback_branch)

    def tag(self, tag: str) -> str:
        """``tag`` in this build's own scope: where it saves."""
        return scoped_tag(self.own, tag)

    def sources(self, tag: str) -> tuple[str, ...]:
        """Where to load ``tag`` from, in order: the own scope, then the fallback's."""
        return tuple(dict.fromkeys((self.tag(tag), scoped_tag(self.fallback, tag))))


def cache_scope(settings: Settings) -> CacheScope:
    """This build's scopes and whether it may save, from the settings."""
    fallback = settings.cache_fallback_branch
    branch = settings.branch or fallback
    read_only = ""
    if settings.cache_read_only == "yes":
        read_only = "LAYERKEEP_CACHE_READ_ONLY=yes"
    elif settings.cache_read_only == "auto" and settings.pull_request:
        read_only = "a pull request build (LAYERKEEP_CACHE_READ_ONLY=auto)"
    elif settings.pull_request and scope_name(branch) == scope_name(fallback):
        read_only = (
            f"a pull request from a branch named {branch!r}, like the fallback branch, "
            "never writes its cache"
        )
    return CacheScope(branch, fallback, read_only)


def cache_tags(settings: Settings, images: Sequence[str]) -> dict[str, str]:
    """Local image name -> its cache tag, before the branch scope (see the module's scheme)."""
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
    environ: Mapping[str, str],
    log: Log = print,
    sleep: Sleep = time.sleep,
    progress: MeterFactory = silent,
) -> SaveReport:
    """Push ``images`` (the app, its stages, extras) as cache tags in this branch's scope.

    An image whose cache tag already holds it (the same layers and config, inline cache
    aside) is left alone. A pushed BuildKit image's inline cache is then completed in
    the registry from the image the tag held before (see build.inline_cache): a new
    config with the same layers, under the same tag.
    """
    started = time.monotonic()
    location = cache_location(settings)
    scope = cache_scope(settings)
    report = SaveReport()
    if scope.read_only:
        log(f"registry cache {location.repository} is read-only here ({scope.read_only}): "
            "nothing pushed")
        return report
    repository = path_in_registry(location.repository)
    with RegistryClient(
        location.credentials, environ=environ, timeout=settings.push_timeout
    ) as client:
        for image, tag in cache_tags(settings, images).items():
            attrs = engine.image_attrs(image)
            if attrs is None:
                report.missing.append(image)
                log(f"warning: {image} is not in the engine, so it was not saved")
                continue
            target = ImageRef(location.repository, scope.tag(tag))
            donors = _configs(client, repository, scope.sources(tag))
            own = donors[0] if donors and donors[0][0] == target.tag else None
            if own is not None and unchanged(attrs, _as_cached(own)):
                report.unchanged.append(image)
                continue
            engine.tag_image(image, str(target))
            pushed = push_tag(
                engine, target, location.credentials, Retries.of(settings, log, sleep),
                progress=progress,
            )
            report.saved.append(image)
            report.layers_written += pushed.layers_pushed
            report.bytes_written += pushed.bytes_pushed
            log(
                f"pushed {image} as {target} ({pushed.layers_pushed} new layer(s), "
                f"{pushed.bytes_pushed / 1e6:.1f} MB, {pushed.seconds:.1f} s)"
            )
            if donors and _complete_in_registry(client, repository, target.tag, donors):
                report.completed.append(image)
    report.seconds = time.monotonic() - started
    if report.completed:
        log(
            f"inline cache completed for {', '.join(report.completed)} in the registry: "
            "BuildKit leaves out the steps a build reused from an imported cache"
        )
    if report.skipped:
        log(f"registry cache {location.repository} (scope {scope.own}) up to date "
            f"({len(report.unchanged)} images), nothing pushed")
    else:
        log(
            f"saved {len(report.saved)} image(s) to {location.repository} "
            f"(scope {scope.own}): "
            f"{report.layers_written} new layer(s), {report.bytes_written / 1e6:.1f} MB pushed, "
            f"{len(report.unchanged)} unchanged, {report.seconds:.1f} s"
        )
    return report


def _configs(
    client: RegistryClient, repository: str, tags: Sequence[str]
) -> list[tuple[str, str, dict[str, Any]]]:
    """The tag, config text and parsed config of each of ``tags`` the registry has (an
    image manifest; an index, which buildx pushes, is not a cache tag of ours)."""
    found = []
    for tag in tags:
        try:
            manifest = client.get_manifest(repository, tag)
        except TagNotFound:
            continue
        content = json.loads(manifest.content)
        config = content.get("config") if isinstance(content, dict) else None
        if not isinstance(config, dict):
            continue
        text = client.get_blob(repository, str(config["digest"])).decode("utf-8")
        found.append((tag, text, json.loads(text)))
    return found


def _as_cached(config: tuple[str, str, dict[str, Any]]) -> CachedImage:
    """A registry's image config as the folder cache would keep it (for ``unchanged``)."""
    _, text, parsed = config
    return CachedImage(image_id_of(text), text, tuple(config_layers(parsed)))


def _complete_in_registry(
    client: RegistryClient,
    repository: str,
    tag: str,
    donors: Sequence[tuple[str, str, dict[str, Any]]],
) -> bool:
    """Complete the inline cache of the image just pushed as ``tag`` from ``donors``."""
    manifest = client.get_manifest(repository, tag)
    content = json.loads(manifest.content)
    config = json.loads(client.get_blob(repository, str(content["config"]["digest"])))
    done = complete(config, [parsed for _, _, parsed in donors])
    if done == config:
        return False
    data = json.dumps(done, separators=(",", ":")).encode()
    content["config"] = {**content["config"], "digest": client.upload_blob(repository, data),
                         "size": len(data)}
    client.put_manifest(repository, tag, json.dumps(content).encode(), manifest.media_type)
    return True


def load_from_registry(
    engine: Engine,
    settings: Settings,
    images: Sequence[str],
    *,
    log: Log = print,
    sleep: Sleep = time.sleep,
    progress: MeterFactory = silent,
) -> RegistryLoadReport:
    """Pull the cache tags of ``images`` (own scope, else the fallback's) and give them
    the names image.build passes as --cache-from."""
    started = time.monotonic()
    location = cache_location(settings)
    scope = cache_scope(settings)
    report = RegistryLoadReport()
    for image, tag in cache_tags(settings, images).items():
        try:
            source, pulled = _pull_first(
                engine, settings, location, scope.sources(tag),
                log=log, sleep=sleep, progress=progress,
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
        if source.tag != scope.tag(tag):
            report.from_fallback.append(image)
        report.bytes_read += pulled.bytes_downloaded
    report.seconds = time.monotonic() - started
    report.cold = report.unreachable or not (report.restored or report.present)
    _log_load(report, location.repository, scope, log)
    return report


def _pull_first(
    engine: Engine,
    settings: Settings,
    location: CacheLocation,
    tags: Sequence[str],
    *,
    log: Log,
    sleep: Sleep,
    progress: MeterFactory,
) -> tuple[ImageRef, Pulled]:
    """Pull the first of ``tags`` the cache repository has; TagNotFound when none."""
    for index, tag in enumerate(tags):
        source = ImageRef(location.repository, tag)
        try:
            return source, pull_tag(
                engine, source, location.credentials, Retries.of(settings, log, sleep),
                progress=progress,
            )
        except TagNotFound:
            if index == len(tags) - 1:
                raise
    raise AssertionError("unreachable: a tag has at least one source")  # pragma: no cover


def _log_load(
    report: RegistryLoadReport, repository: str, scope: CacheScope, log: Log
) -> None:
    if report.unreachable:
        return
    if not (report.restored or report.present or report.missing or report.failed):
        return  # nothing asked for: where BuildKit's own cache is kept, image.build reads it
    scopes = scope.own if scope.own == scope.fallback else f"{scope.own}, else {scope.fallback}"
    if report.cold and not report.failed:
        log(f"no cache in {repository} (scope {scopes}) yet: this is a cold build")
        return
    missing = f", {len(report.missing)} not cached yet" if report.missing else ""
    fallback = (
        f", {len(report.from_fallback)} of them from {scope.fallback_branch}'s scope"
        if report.from_fallback else ""
    )
    log(
        f"restored {len(report.restored)} image(s) from {repository} (scope {scopes}"
        f"{fallback}; {report.bytes_read / 1e6:.1f} MB pulled, {report.seconds:.1f} s); "
        f"{len(report.present)} already present{missing}, {len(report.failed)} skipped"
    )
