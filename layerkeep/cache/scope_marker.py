"""Each branch scope of the registry cache carries a marker: when it was saved, and
whether cache.prune is removing it.

The marker is the tag ``<scope>--layerkeep.scope`` of the cache repository: an OCI
manifest without layers whose config (media type ``CONFIG_TYPE``) is a small JSON
record ``{"state", "branch", "at", "build_id"}``. cache.save writes it (``saved``) after
the scope's images; cache.prune first turns it into ``pruning``, deletes the scope's
other tags, and deletes it last. A registry cannot delete tags together, so the marker
is what makes a scope whole or absent to a reader (see cache.whole_scope):

- ``saved``: the scope is whole;
- ``pruning``: it is going, whatever of it is left: read the fallback's;
- none: never marked (saved before markers existed) or removed whole.

A registry deletes manifests by digest only, and a delete removes every tag naming that
manifest, the fallback branch's too when both hold the same image. So a tag is never
deleted through the image it names: it is first pointed at a tombstone, a manifest
nobody else can name (a fresh random nonce in its config), and that is deleted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from layerkeep.cache.registry_backend import (
    cache_location,
    cache_scope,
    scoped_tag,
)
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.registry_api import OCI_MANIFEST, RegistryClient
from layerkeep.core.registry_credentials import path_in_registry
from layerkeep.core.registry_failures import TagNotFound
from layerkeep.core.settings import Settings

MARKER_TAG = "layerkeep.scope"
CONFIG_TYPE = "application/vnd.layerkeep.scope.v1+json"
TOMBSTONE_TYPE = "application/vnd.layerkeep.tombstone.v1+json"
State = Literal["saved", "pruning"]
STATES: tuple[State, ...] = ("saved", "pruning")


@dataclass(frozen=True)
class Marker:
    """A scope's marker as read back: its state, the branch and build that wrote it, when."""

    state: State
    branch: str
    at: float
    build_id: str
    digest: str


def marker_tag(scope: str) -> str:
    """The marker's tag in the scope ``scope``."""
    return scoped_tag(scope, MARKER_TAG)


def write_marker(
    client: RegistryClient, repository: str, scope: str, *, state: State, branch: str,
    build_id: str, at: float,
) -> str:
    """Put the scope's marker; its manifest digest."""
    record = {"state": state, "branch": branch, "at": at, "build_id": build_id,
              "nonce": os.urandom(8).hex()}
    return _put(client, repository, marker_tag(scope), record, CONFIG_TYPE)


def read_marker(client: RegistryClient, repository: str, scope: str) -> Marker | None:
    """The scope's marker, or None when it has none (or the tag holds something else)."""
    try:
        manifest = client.get_manifest(repository, marker_tag(scope))
    except TagNotFound:
        return None
    content = json.loads(manifest.content)
    config = content.get("config") if isinstance(content, dict) else None
    if not isinstance(config, dict) or config.get("mediaType") != CONFIG_TYPE:
        return None
    try:
        record = json.loads(client.get_blob(repository, str(config["digest"])))
        state = str(record["state"])
        if state not in STATES:
            return None
        return Marker(
            state, str(record.get("branch", "")), float(record["at"]),
            str(record.get("build_id", "")), manifest.digest,
        )
    except (ValueError, KeyError, TypeError):
        return None


def delete_tag(client: RegistryClient, repository: str, tag: str) -> None:
    """Remove ``tag`` alone: point it at a tombstone, then delete the tombstone."""
    record = {"tombstone": tag, "nonce": os.urandom(8).hex()}
    digest = _put(client, repository, tag, record, TOMBSTONE_TYPE)
    client.delete_manifest(repository, digest)


def mark_saved(settings: Settings, environ: Mapping[str, str], *, log: Log) -> bool:
    """After a registry save: mark this branch's scope saved now; whether it was marked.

    A marker that cannot be written is a warning: the scope's age then comes from its
    images, and a reader cannot tell a prune apart from it until the next save.
    """
    scope = cache_scope(settings)
    if scope.read_only:
        return False
    location = cache_location(settings)
    try:
        with RegistryClient(
            location.credentials, environ=environ, timeout=settings.docker_timeout
        ) as client:
            write_marker(
                client, path_in_registry(location.repository), scope.own,
                state="saved", branch=scope.branch, build_id=settings.build_id, at=time.time(),
            )
    except DockerOperationError as error:
        log(f"warning: the scope's marker was not written: {error.one_line()}")
        return False
    return True


def _put(
    client: RegistryClient, repository: str, tag: str, record: Mapping[str, object],
    media_type: str,
) -> str:
    config = json.dumps(record, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": media_type, "size": len(config),
                   "digest": client.upload_blob(repository, config)},
        "layers": [],
    }
    return client.put_manifest(repository, tag, json.dumps(manifest).encode(), OCI_MANIFEST)
