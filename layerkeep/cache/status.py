"""cache.status: what the cache holds, for either backend, as a table or as JSON.

- dir backend: each image (layers, size, the bytes no other image shares, last used),
  the cache mounts, BuildKit's own cache, the folder's size on disk and its budget
  (LAYERKEEP_CACHE_MAX_MB), and the last save and restore (when, which build id).
- registry backend: each branch scope of the cache repository (its branch, what its
  tags hold, size, the bytes no other scope shares, when it was last saved and how
  many days ago), the fallback branch's marked.

It only reads: nothing is locked or written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from layerkeep.cache.budget import MB, folder_size
from layerkeep.cache.buildkit_dir import FOLDER as BUILDKIT_FOLDER
from layerkeep.cache.manifest import Manifest
from layerkeep.cache.mount_folder import MountStore
from layerkeep.cache.registry_backend import cache_location, cache_scope
from layerkeep.cache.registry_scopes import age_days, read_scopes, unique_sizes, when
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CorruptCache
from layerkeep.cache.usage import Event, image_key, mount_key, read_usage
from layerkeep.core.registry_api import RegistryClient
from layerkeep.core.registry_credentials import path_in_registry
from layerkeep.core.settings import Settings

Status = dict[str, Any]


def cache_status(
    settings: Settings, environ: Mapping[str, str], *, now: Callable[[], float] = time.time
) -> Status:
    """What the cache the settings name holds (see the module's notes), as plain data."""
    if settings.cache_backend == "registry":
        return registry_status(settings, environ, now=now())
    return dir_status(settings.cache_dir, max_mb=settings.cache_max_mb)


def dir_status(cache_dir: Path, *, max_mb: int = 0) -> Status:
    """The folder cache at ``cache_dir``, as plain data."""
    cache = CacheDir(cache_dir)
    status: Status = {"backend": "dir", "folder": str(cache_dir), "exists": cache.exists(),
                      "max_mb": max_mb, "images": [], "mounts": [], "buildkit": None}
    if not status["exists"]:
        return status
    try:
        manifest = cache.read_manifest()
        problem = ""
    except CorruptCache as error:
        manifest, problem = Manifest(), error.message
    usage = read_usage(cache_dir)
    users: dict[str, int] = {}
    for image in manifest.images.values():
        for digest in set(image.layers):
            users[digest] = users.get(digest, 0) + 1
    for tag, image in sorted(manifest.images.items()):
        layers = [manifest.blobs[d] for d in dict.fromkeys(image.layers) if d in manifest.blobs]
        status["images"].append({
            "tag": tag,
            "layers": len(image.layers),
            "bytes": sum(blob.stored for blob in layers),
            "unique_bytes": sum(
                manifest.blobs[d].stored for d in set(image.layers)
                if d in manifest.blobs and users[d] == 1
            ),
            "last_used": usage.used.get(image_key(tag)),
        })
    try:
        mounts = MountStore(cache_dir).read_index()
    except CorruptCache as error:
        mounts, problem = {}, problem or error.message
    for kept in sorted(mounts.values(), key=lambda k: k.id):
        status["mounts"].append({
            "id": kept.id, "bytes": _size(MountStore(cache_dir).folder / kept.file),
            "content_bytes": kept.size, "saved": kept.saved,
            "last_used": max(usage.used.get(mount_key(kept.id), 0.0), kept.saved),
        })
    if manifest.buildkit is not None:
        status["buildkit"] = {"bytes": folder_size(cache_dir / BUILDKIT_FOLDER),
                              "cache_manifest": manifest.buildkit.get("digest", "")}
    status.update(
        layers=len(manifest.blobs),
        bytes=folder_size(cache_dir),
        layer_bytes=sum(blob.stored for blob in manifest.blobs.values()),
        last_saved=_event(usage.saved) or {"at": _mtime(cache.manifest_path), "build_id": ""},
        last_restored=_event(usage.restored),
        problem=problem,
    )
    return status


def registry_status(settings: Settings, environ: Mapping[str, str], *, now: float) -> Status:
    """The registry cache's scopes, as plain data."""
    location = cache_location(settings)
    fallback = cache_scope(settings).fallback
    with RegistryClient(
        location.credentials, environ=environ, timeout=settings.docker_timeout
    ) as client:
        scopes = read_scopes(client, path_in_registry(location.repository))
    unique = unique_sizes(scopes)
    rows = []
    for scope in scopes:
        kinds: dict[str, int] = {}
        for tag in scope.tags:
            kinds[tag.kind] = kinds.get(tag.kind, 0) + 1
        rows.append({
            "scope": scope.name,
            "branch": scope.branch,
            "fallback": scope.name == fallback,
            "state": scope.marker.state if scope.marker else "unmarked",
            "tags": kinds,
            "tag_names": [tag.tag for tag in scope.tags],
            "bytes": scope.size(),
            "unique_bytes": unique[scope.name],
            "last_saved": scope.saved,
            "saved_by": scope.marker.build_id if scope.marker else "",
            "age_days": age_days(scope.saved, now),
        })
    every = {d: s for scope in scopes for d, s in scope.blobs().items()}
    return {"backend": "registry", "repository": location.repository, "scopes": rows,
            "bytes": sum(every.values()), "last_restored": None}


def status_lines(status: Status) -> list[str]:
    """The plain table for a person."""
    if status["backend"] == "registry":
        return _registry_lines(status)
    return _dir_lines(status)


def _dir_lines(status: Status) -> list[str]:
    if not status["exists"]:
        return [f"no cache at {status['folder']} yet: the first cache.save writes it"]
    budget = f" of {status['max_mb']} MB allowed" if status["max_mb"] else " (no limit)"
    lines = [
        f"cache folder {status['folder']}: {_mb(status['bytes'])}{budget}, "
        f"{status['layers']} layers",
        f"last saved     {_who(status['last_saved'])}",
        f"last restored  {_who(status['last_restored'])}",
    ]
    if status["problem"]:
        lines.append(f"warning: {status['problem']}")
    lines += _table(
        ["image", "layers", "size", "own", "last used"],
        [[i["tag"], str(i["layers"]), _mb(i["bytes"]), _mb(i["unique_bytes"]),
          when(i["last_used"])] for i in status["images"]],
    )
    if status["mounts"]:
        lines += _table(
            ["cache mount", "size", "content", "last used"],
            [[m["id"], _mb(m["bytes"]), _mb(m["content_bytes"]), when(m["last_used"])]
             for m in status["mounts"]],
        )
    if status["buildkit"]:
        lines.append(f"BuildKit cache: {_mb(status['buildkit']['bytes'])}")
    return lines


def _registry_lines(status: Status) -> list[str]:
    lines = [f"registry cache {status['repository']}: {len(status['scopes'])} scope(s), "
             f"{_mb(status['bytes'])}"]
    rows = []
    for scope in status["scopes"]:
        held = ", ".join(f"{n} {kind}" for kind, n in sorted(scope["tags"].items())) or "-"
        age = "-" if scope["age_days"] is None else f"{scope['age_days']:.1f}"
        name = scope["scope"] + (" (fallback)" if scope["fallback"] else "")
        rows.append([name, scope["branch"] or "-", held, _mb(scope["bytes"]),
                     _mb(scope["unique_bytes"]), when(scope["last_saved"]), age,
                     scope["saved_by"] or "-", scope["state"]])
    return lines + _table(
        ["scope", "branch", "tags", "size", "own", "last saved", "days", "build", "state"], rows
    )


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [head, *rows]]


def _who(event: Mapping[str, Any] | None) -> str:
    if not event or event.get("at") is None:
        return "never"
    by = f" by build {event['build_id']}" if event.get("build_id") else ""
    return f"{when(event['at'])} UTC{by}"


def _event(event: Event | None) -> dict[str, Any] | None:
    return None if event is None else {"at": event.at, "build_id": event.build_id,
                                      "items": list(event.items)}


def _mb(size: int) -> str:
    return f"{size / MB:.1f} MB"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None
