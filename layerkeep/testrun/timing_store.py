"""The test timing history travels with the cache: read before a split, written after.

- dir backend: ``test-timings.json`` in the cache folder, merged under the folder's lock
  and replaced atomically at the end of test.run (cache.save runs before the tests, and
  the CI saves the folder after the job).
- registry backend: a small image per node, ``<cache repository>:<scope>--<tag>-test-
  timings-<node>`` in the branch's scope (never written by a read-only build), pushed
  through the registry API; all of a scope's are read and merged, from the branch's
  scope, else the fallback branch's. So every node's timings of the last run reach the
  next.

Reading returns None when there is history but it cannot be read (a split CI node then
runs every file); an unwritten history is a warning: it only balances later splits.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Collection, Mapping
from typing import Any

from layerkeep.cache.registry_backend import cache_location, cache_scope, scoped_tag
from layerkeep.cache.store import CacheDir
from layerkeep.core.atomic import atomic_write
from layerkeep.core.errors import DockerOperationError, LayerkeepError
from layerkeep.core.imageref import is_valid_tag
from layerkeep.core.log import Log
from layerkeep.core.registry_api import (
    DOCKER_MANIFEST,
    RegistryClient,
    digest_of,
)
from layerkeep.core.registry_api_errors import RegistryAPIError
from layerkeep.core.registry_credentials import path_in_registry
from layerkeep.core.registry_failures import Retries
from layerkeep.core.settings import Settings
from layerkeep.testrun.split import Node
from layerkeep.testrun.timings import (
    FORMAT,
    History,
    history_text,
    merge,
    parse_history,
)

TIMINGS_FILE = "test-timings.json"
TAG_SUFFIX = "-test-timings"
# Nodes whose registry tags are read: as many as LAYERKEEP_NODE_TOTAL allows.
MAX_NODES = 1000
_MEMBER = "layerkeep-test-timings.json"
_CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
_LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def load_history(settings: Settings, environ: Mapping[str, str], *, log: Log) -> History | None:
    """The timing history kept with the cache: {} when there is none yet, None when it
    cannot be read (a warning)."""
    if settings.cache_backend == "registry":
        return _read_registry(settings, environ, log)
    path = settings.cache_dir / TIMINGS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as error:
        log(f"warning: cannot read the test timings {path}: {error}")
        return None
    return parse_history(text, where=str(path), log=log)


def save_history(
    settings: Settings,
    environ: Mapping[str, str],
    fresh: History,
    *,
    node: Node,
    keep: Collection[str],
    log: Log,
) -> bool:
    """Merge this run's timings into the kept history (only files in ``keep``: the test
    files there are now); whether they were written."""
    if not fresh:
        return False
    try:
        if settings.cache_backend == "registry":
            return _write_registry(settings, environ, fresh, node=node, keep=keep, log=log)
        cache = CacheDir(settings.cache_dir)
        path = cache.root / TIMINGS_FILE
        with cache.locked():
            # Another job sharing the folder may have written since we read.
            kept = load_history(settings, environ, log=log) or {}
            merged = merge(kept, fresh)
            history = {name: entry for name, entry in merged.items() if name in keep}
            atomic_write(path, history_text(history).encode(), mode=0o644)
    except (OSError, LayerkeepError) as error:
        text = error.one_line() if isinstance(error, LayerkeepError) else str(error)
        log(f"warning: test timings not saved, later splits balance by older ones: {text}")
        return False
    return True


def _base_tag(settings: Settings) -> str:
    tag = f"{settings.require_image().tag}{TAG_SUFFIX}"
    return tag if is_valid_tag(f"{tag}-{MAX_NODES}") else TAG_SUFFIX.lstrip("-")


def _read_registry(settings: Settings, environ: Mapping[str, str], log: Log) -> History | None:
    location = cache_location(settings)
    scope = cache_scope(settings)
    repository = path_in_registry(location.repository)
    base = _base_tag(settings)

    def read(_: float | None) -> History:
        with RegistryClient(
            location.credentials, environ=environ, timeout=settings.docker_timeout
        ) as client:
            try:
                listed = set(client.tags(repository))
            except RegistryAPIError as error:
                if error.status == 404:  # no cache repository yet
                    return {}
                raise
            for own in dict.fromkeys((scope.own, scope.fallback)):
                tags = [scoped_tag(own, f"{base}-{k}") for k in range(1, MAX_NODES + 1)]
                found = [tag for tag in tags if tag in listed]
                if found:
                    where = f"{location.repository}:{{{','.join(found)}}}"
                    texts = [_read_document(client, repository, tag) for tag in found]
                    parsed = [parse_history(text, where=where, log=log) for text in texts]
                    if any(history is None for history in parsed):
                        raise DockerOperationError(f"damaged test timings in {where}")
                    return merge(*(history for history in parsed if history is not None))
        return {}

    try:
        history, _ = Retries.of(settings, log).run(
            read, action="read test timings", reference=location.repository,
            credentials=location.credentials,
        )
    except DockerOperationError as error:
        log(f"warning: cannot read the test timings in {location.repository}: "
            f"{error.one_line()}")
        return None
    return history


def _write_registry(
    settings: Settings,
    environ: Mapping[str, str],
    fresh: History,
    *,
    node: Node,
    keep: Collection[str],
    log: Log,
) -> bool:
    scope = cache_scope(settings)
    if scope.read_only:
        log(f"test timings not saved: the registry cache is read-only here ({scope.read_only})")
        return False
    kept = _read_registry(settings, environ, log) or {}
    merged = merge(kept, fresh)
    history = {name: entry for name, entry in merged.items() if name in keep}
    location = cache_location(settings)
    tag = scope.tag(f"{_base_tag(settings)}-{node.index}")

    def write(_: float | None) -> None:
        with RegistryClient(
            location.credentials, environ=environ, timeout=settings.docker_timeout
        ) as client:
            _write_document(client, path_in_registry(location.repository), tag,
                            history_text(history))

    Retries.of(settings, log).run(
        write, action="push test timings", reference=f"{location.repository}:{tag}",
        credentials=location.credentials,
    )
    log(f"test timings of {len(fresh)} file(s) saved as {location.repository}:{tag}")
    return True


def _write_document(client: RegistryClient, repository: str, tag: str, text: str) -> None:
    """Store ``text`` as a one-file image under ``tag`` (a docker pull of it works too)."""
    data = text.encode()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo(_MEMBER)
        member.size, member.mode, member.mtime = len(data), 0o644, 0
        tar.addfile(member, io.BytesIO(data))
    layer = gzip.compress(archive.getvalue(), mtime=0)
    config: dict[str, Any] = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"io.layerkeep.test-timings": FORMAT}},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(archive.getvalue())]},
    }
    config_blob = json.dumps(config, separators=(",", ":"), sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": _CONFIG_TYPE, "size": len(config_blob),
                   "digest": client.upload_blob(repository, config_blob)},
        "layers": [{"mediaType": _LAYER_TYPE, "size": len(layer),
                    "digest": client.upload_blob(repository, layer)}],
    }
    client.put_manifest(repository, tag, json.dumps(manifest).encode(), DOCKER_MANIFEST)


def _read_document(client: RegistryClient, repository: str, tag: str) -> str:
    """The text :func:`_write_document` stored under ``tag``."""
    manifest = json.loads(client.get_manifest(repository, tag).content)
    try:
        digest = str(manifest["layers"][0]["digest"])
        layer = gzip.decompress(client.get_blob(repository, digest))
        with tarfile.open(fileobj=io.BytesIO(layer)) as tar:
            found = tar.extractfile(_MEMBER)
            if found is None:
                raise KeyError(_MEMBER)
            return found.read().decode("utf-8")
    except (KeyError, IndexError, TypeError, OSError, tarfile.TarError, UnicodeDecodeError):
        raise DockerOperationError(
            f"{repository}:{tag} holds no test timings of layerkeep's"
        ) from None
