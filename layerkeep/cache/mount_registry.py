"""LAYERKEEP_CACHE_MOUNTS, registry backend: one image per mount beside the cache tags, in
the branch's scope like them (``<cache repository>:<scope>--<app tag>-mount-<id as a
tag>-<hash>``, read from the own scope, else the fallback branch's; a read-only build saves
none); its one layer is the mount's files (the engine compresses it for the push), its
label their digest. The engine keeps that tag, which is how an unchanged mount costs one
registry lookup.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from layerkeep.building.cache_mounts import CacheMount
from layerkeep.cache.mount_folder import CHUNK
from layerkeep.cache.registry_backend import (
    CacheLocation,
    CacheScope,
    cache_location,
    cache_scope,
)
from layerkeep.core.engine import Engine
from layerkeep.core.errors import ResourceConflict
from layerkeep.core.imageref import ImageRef
from layerkeep.core.log import Log
from layerkeep.core.registry import local_digests, pull_tag, push_tag, remote_digest
from layerkeep.core.registry_failures import Retries, TagNotFound
from layerkeep.core.settings import Settings
from layerkeep.core.tag_names import TAG_MAX, safe_tag
from layerkeep.core.tarstream import chunks_of

DIGEST_LABEL = "io.layerkeep.cache-mount.digest"


def mount_registry(engine: Engine, settings: Settings, log: Log) -> MountRegistry | None:
    """Where the mounts go with the registry backend; None with the dir backend."""
    if settings.cache_backend != "registry":
        return None
    return MountRegistry(engine, settings, cache_location(settings), cache_scope(settings), log)


def mount_tag(settings: Settings, mount: CacheMount) -> str:
    """The tag of a mount's image in the cache repository, beside the app's cache tags."""
    prefix = f"{settings.require_image().tag}-mount-"
    return prefix + safe_tag(
        mount.key, empty_prefix="mount", always_hash=True, limit=TAG_MAX - len(prefix)
    )


@dataclass(frozen=True)
class MountRegistry:
    """The cache repository, reached through the engine with the settings' retries."""

    engine: Engine
    settings: Settings
    location: CacheLocation
    scope: CacheScope
    log: Log

    def reference(self, mount: CacheMount) -> ImageRef:
        """Where this build saves the mount: its tag in the branch's own scope."""
        return ImageRef(self.location.repository, self.scope.tag(mount_tag(self.settings, mount)))

    def push(self, mount: CacheMount, path: Path, digest: str) -> int | None:
        """Push the mount's tar as an image, unless the registry holds these contents; the
        bytes pushed, or None when it held them."""
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
                return None
        with path.open("rb") as archive:
            image_id = engine.import_image(
                chunks_of(archive, CHUNK), reference=str(target),
                changes=[f"LABEL {DIGEST_LABEL}={digest}"],
            )
        engine.tag_image(image_id, str(target))
        if old is not None and old["Id"] != image_id:
            with contextlib.suppress(ResourceConflict):
                engine.remove_image(str(old["Id"]))
        pushed = push_tag(
            engine, target, self.location.credentials, Retries.of(self.settings, self.log)
        )
        self.log(f"pushed cache mount {mount.id} as {target} "
                 f"({pushed.bytes_pushed / 1e6:.1f} MB, {pushed.seconds:.1f} s)")
        return pushed.bytes_pushed

    def pull(self, mount: CacheMount) -> tuple[str, int] | None:
        """Pull the mount's image from the own scope, else the fallback branch's; its name
        and the bytes that came down, or None when neither has it."""
        for tag in self.scope.sources(mount_tag(self.settings, mount)):
            source = ImageRef(self.location.repository, tag)
            try:
                pulled = pull_tag(
                    self.engine, source, self.location.credentials,
                    Retries.of(self.settings, self.log),
                )
            except TagNotFound:
                continue
            return str(source), pulled.bytes_downloaded
        return None

