"""What the registry cache holds, scope by scope: read through the registry's API.

Every tag of the cache repository named ``<scope>--<tag>`` (see cache.registry_backend)
belongs to a scope: the app's images and stages, LAYERKEEP_CACHE_IMAGES entries, build
records (``-build-record``), cache-mount images (``-mount-``), BuildKit's cache
(``buildcache``) and the scope's marker (cache.scope_marker). A tag without ``--`` is
not layerkeep's and is left out.

A scope was last saved when its marker says; a scope saved before markers existed, at
the newest creation time of its images' configs (an image is built shortly before it
is saved), and at no known time when it holds no image config.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from layerkeep.cache.registry_backend import SCOPE_SEPARATOR
from layerkeep.cache.scope_marker import MARKER_TAG, Marker, read_marker
from layerkeep.core.registry_api import RegistryClient
from layerkeep.core.registry_api_errors import RegistryAPIError
from layerkeep.core.registry_failures import TagNotFound

IMAGE_CONFIGS = (
    "application/vnd.docker.container.image.v1+json",
    "application/vnd.oci.image.config.v1+json",
)


@dataclass(frozen=True)
class CachedTag:
    """One tag of a scope: its manifest, the blobs it names (digest -> size), what it is."""

    tag: str
    digest: str
    blobs: Mapping[str, int]
    kind: str
    # The image config's digest ("" when it names none: BuildKit's cache, a marker).
    config: str = ""
    created: float | None = None


@dataclass
class Scope:
    """One branch scope of the cache repository."""

    name: str
    tags: list[CachedTag] = field(default_factory=list)
    marker: Marker | None = None

    @property
    def saved(self) -> float | None:
        """When it was last saved (epoch seconds), or None when nothing says."""
        if self.marker is not None:
            return self.marker.at
        times = [tag.created for tag in self.tags if tag.created is not None]
        return max(times) if times else None

    @property
    def branch(self) -> str:
        """The branch that saved it, where its marker says ("" otherwise)."""
        return self.marker.branch if self.marker is not None else ""

    def blobs(self) -> dict[str, int]:
        """Every blob its tags name, once each."""
        return {digest: size for tag in self.tags for digest, size in tag.blobs.items()}

    def size(self) -> int:
        """Its blobs' bytes, each counted once."""
        return sum(self.blobs().values())


def read_scopes(client: RegistryClient, repository: str) -> list[Scope]:
    """Every scope of ``repository`` (a path in the registry), by name; empty when the
    repository does not exist yet."""
    try:
        tags = client.tags(repository)
    except RegistryAPIError as error:
        if error.status == 404:  # NAME_UNKNOWN: nothing was ever saved there
            return []
        raise
    by_name: dict[str, Scope] = {}
    for tag in sorted(tags):
        name, separator, rest = tag.partition(SCOPE_SEPARATOR)
        if not separator or not name:
            continue
        scope = by_name.setdefault(name, Scope(name))
        if rest == MARKER_TAG:
            scope.marker = read_marker(client, repository, name)
            continue
        found = _read_tag(client, repository, tag, rest)
        if found is not None:
            scope.tags.append(found)
    for scope in by_name.values():
        if scope.marker is None:
            scope.tags = [_with_created(client, repository, tag) for tag in scope.tags]
    return [by_name[name] for name in sorted(by_name)]


def unique_sizes(scopes: Iterable[Scope]) -> dict[str, int]:
    """Scope -> the bytes of the blobs no other scope names: what removing it alone frees."""
    listed = list(scopes)
    owners: dict[str, set[str]] = {}
    for scope in listed:
        for digest in scope.blobs():
            owners.setdefault(digest, set()).add(scope.name)
    return {
        scope.name: sum(
            size for digest, size in scope.blobs().items() if owners[digest] == {scope.name}
        )
        for scope in listed
    }


def kind_of(tag: str) -> str:
    """What a tag in a scope holds, by its name (see the module's notes)."""
    if tag == "buildcache":
        return "buildkit"
    if tag.endswith("-build-record"):
        return "record"
    if "-mount-" in tag:
        return "mount"
    if tag.startswith("extra-"):
        return "extra"
    return "image"


def age_days(saved: float | None, now: float) -> float | None:
    """Days since ``saved``."""
    return None if saved is None else max(0.0, (now - saved) / 86400)


def when(saved: float | None) -> str:
    """``2026-12-06 22:10`` (UTC), or ``-``."""
    if saved is None:
        return "-"
    return datetime.datetime.fromtimestamp(saved, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def _read_tag(client: RegistryClient, repository: str, tag: str, rest: str) -> CachedTag | None:
    try:
        manifest = client.get_manifest(repository, tag)
    except TagNotFound:
        return None  # deleted since the listing
    content = json.loads(manifest.content)
    blobs: dict[str, int] = {}
    config = ""
    if isinstance(content, dict):
        descriptors: list[Any] = [content.get("config"), *(content.get("layers") or []),
                                  *(content.get("manifests") or [])]
        for item in descriptors:
            if isinstance(item, dict) and "digest" in item:
                blobs[str(item["digest"])] = int(item.get("size") or 0)
        described = content.get("config")
        if isinstance(described, dict) and str(described.get("mediaType")) in IMAGE_CONFIGS:
            config = str(described.get("digest", ""))
    return CachedTag(tag, manifest.digest, blobs, kind_of(rest), config)


def _with_created(client: RegistryClient, repository: str, tag: CachedTag) -> CachedTag:
    """``tag`` with its image config's creation time, for a scope without a marker."""
    if not tag.config:
        return tag
    try:
        created = json.loads(client.get_blob(repository, tag.config))["created"]
        stamp = datetime.datetime.fromisoformat(str(created)).timestamp()
    except (TagNotFound, ValueError, KeyError, TypeError):
        return tag
    return replace(tag, created=stamp)
