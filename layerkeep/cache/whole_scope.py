"""A registry load gets a branch scope whole, or the fallback branch's: never a scope
cache.prune has half removed.

The load reads the scope's marker (see cache.scope_marker) before and after it pulls.
``pruning`` before: the scope is going, so the fallback's scope is loaded instead.
``pruning`` after, or a marker that was there before and is gone after: a prune ran
while the images were pulled, so whatever came from the scope is set aside and the
fallback's scope is loaded instead (each pull got a whole image or a clean miss: a
delete only unlinks a manifest, the blobs stay until the registry's garbage collection).
A marker that cannot be read changes nothing: the load itself says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, TypeVar

from layerkeep.cache.registry_backend import cache_location, cache_scope
from layerkeep.cache.scope_marker import read_marker
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.registry_api import RegistryClient
from layerkeep.core.registry_credentials import path_in_registry
from layerkeep.core.settings import Settings

Loaded = TypeVar("Loaded")
Seen = Literal["saved", "pruning", "none", "unknown"]


def load_whole_scope(
    load: Callable[[Settings], Loaded],
    settings: Settings,
    environ: Mapping[str, str],
    *,
    log: Log,
) -> Loaded:
    """``load(settings)``, or ``load`` of the fallback branch's settings when the own
    scope is being pruned (see the module's notes)."""
    scope = cache_scope(settings)
    if scope.own == scope.fallback:
        return load(settings)  # the fallback's scope is never pruned
    fallback = settings.with_flags(branch=scope.fallback_branch)
    before = _seen(settings, environ)
    if before == "pruning":
        log(f"the cache scope {scope.own} is being pruned: loading "
            f"{scope.fallback_branch}'s scope instead")
        return load(fallback)
    loaded = load(settings)
    after = _seen(settings, environ)
    if after == "pruning" or (before == "saved" and after == "none"):
        log(f"the cache scope {scope.own} was pruned while it was read: loading "
            f"{scope.fallback_branch}'s scope instead")
        return load(fallback)
    return loaded


def _seen(settings: Settings, environ: Mapping[str, str]) -> Seen:
    location = cache_location(settings)
    try:
        with RegistryClient(
            location.credentials, environ=environ, timeout=settings.docker_timeout
        ) as client:
            marker = read_marker(
                client, path_in_registry(location.repository), cache_scope(settings).own
            )
    except DockerOperationError:  # unreachable, refused: the load itself says why
        return "unknown"
    return "none" if marker is None else marker.state
