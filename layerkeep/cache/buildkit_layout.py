"""BuildKit's cache as an OCI layout (``type=local``): ``blobs/sha256/<hex>`` (the layers
as BuildKit compressed them, its cache config, the cache manifest) and an ``index.json``
naming the cache manifest; how each is read, checked and written.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from layerkeep.cache.store_errors import CorruptCache
from layerkeep.core.atomic import atomic_write
from layerkeep.core.tarstream import chunks_of

INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.buildkit.cacheconfig.v0"
_REF_NAME = "org.opencontainers.image.ref.name"
_TAG = "latest"
_DIGEST = re.compile(r"sha256:(?P<hex>[0-9a-f]{64})")
_CHUNK = 1 << 20


def blob_path(root: Path, digest: str) -> Path:
    """Where an OCI layout at ``root`` keeps a blob; CorruptCache for a non-digest name."""
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise CorruptCache(f"{digest!r} is not a sha256 digest", path=root)
    return root / "blobs" / "sha256" / match["hex"]

def cache_metadata(descriptors: Iterable[dict[str, Any]]) -> set[str]:
    """The digests of the cache manifest and its config: without them, no cache at all."""
    return {
        str(each["digest"])
        for each in descriptors
        if each.get("mediaType") in (INDEX_TYPE, CONFIG_TYPE)
    }


def blob_descriptors(
    root: Path, descriptor: dict[str, Any], *, missing_ok: bool = False
) -> list[dict[str, Any]]:
    """The cache manifest's descriptor, then every blob it names (config, layers)."""
    try:
        content = json.loads(blob_path(root, str(descriptor["digest"])).read_bytes())
        listed = content["manifests"]
        if not isinstance(listed, list):
            raise TypeError("manifests is not a list")
        unique = {str(each["digest"]): dict(each) for each in [descriptor, *listed]}
        return list(unique.values())
    except FileNotFoundError:
        if missing_ok:
            return [descriptor]
        raise CorruptCache(
            f"the BuildKit cache manifest {str(descriptor.get('digest'))[:19]} is missing",
            path=root,
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCache(f"the BuildKit cache manifest is damaged ({error})", path=root) from None


def without_blobs(
    root: Path, descriptor: dict[str, Any], damaged: set[str]
) -> dict[str, Any]:
    """A cache manifest like ``descriptor``'s whose config gives no result over a damaged
    blob (or a layer above one); written into ``root``. Returns its descriptor."""
    manifest = json.loads(blob_path(root, str(descriptor["digest"])).read_bytes())
    entries = manifest["manifests"]
    config_entry = next(e for e in entries if e.get("mediaType") == CONFIG_TYPE)
    config = json.loads(blob_path(root, str(config_entry["digest"])).read_bytes())
    layers = config.get("layers") or []
    bad: set[int] = set()
    for index, layer in enumerate(layers):  # parents come first in BuildKit's order
        parent = layer.get("parent", -1)
        if layer.get("blob") in damaged or (isinstance(parent, int) and parent in bad):
            bad.add(index)
    changed = True
    while changed:  # and in any order
        changed = False
        for index, layer in enumerate(layers):
            if index not in bad and layer.get("parent", -1) in bad:
                bad.add(index)
                changed = True
    for record in config.get("records") or []:
        if "layers" in record:
            record["layers"] = [r for r in record["layers"] if r.get("layer") not in bad]
        if "chains" in record:
            record["chains"] = [
                c for c in record["chains"] if not bad & set(c.get("layers") or [])
            ]
    config_entry.update(_write_blob(root, json.dumps(config).encode(), CONFIG_TYPE))
    return {**_write_blob(root, json.dumps(manifest).encode(), INDEX_TYPE)}


def _write_blob(root: Path, data: bytes, media_type: str) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    atomic_write(blob_path(root, digest), data, mode=0o644)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def write_index(root: Path, descriptor: dict[str, Any]) -> None:
    """The OCI layout's index naming ``descriptor`` (what BuildKit's importer reads)."""
    entry = {**descriptor, "annotations": {_REF_NAME: _TAG}}
    index = {"schemaVersion": 2, "mediaType": INDEX_TYPE, "manifests": [entry]}
    atomic_write(root / "index.json", json.dumps(index).encode(), mode=0o644)
    layout = root / "oci-layout"
    if not layout.is_file():
        atomic_write(layout, b'{"imageLayoutVersion":"1.0.0"}', mode=0o644)


def exported(folder: Path) -> dict[str, Any]:
    """The descriptor of the cache manifest BuildKit exported into ``folder``."""
    try:
        index = json.loads((folder / "index.json").read_bytes())
        entries = [e for e in index["manifests"] if isinstance(e, dict)]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CorruptCache(
            f"BuildKit's export in {folder} has no readable index.json ({error})", path=folder
        ) from None
    tagged = [e for e in entries if (e.get("annotations") or {}).get(_REF_NAME) == _TAG]
    found = (tagged or entries)[-1:] if entries else []
    if not found:
        raise CorruptCache(f"BuildKit's export in {folder} names no cache", path=folder)
    return {key: found[0][key] for key in ("mediaType", "digest", "size") if key in found[0]}


def check_export(source: Path, descriptor: dict[str, Any]) -> None:
    """A blob BuildKit wrote must be what its descriptor says: else nothing is saved."""
    digest = str(descriptor["digest"])
    if not (has_size(source, int(descriptor["size"])) and content_is(source, digest)):
        raise CorruptCache(
            f"BuildKit's export wrote {digest[:19]} with other content; the cache was left "
            "as it was",
            path=source,
        )


def has_size(path: Path, size: int) -> bool:
    """Whether ``path`` is a file of ``size`` bytes (False when it cannot be read)."""
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def content_is(path: Path, digest: str) -> bool:
    """Whether ``path`` holds content of ``digest`` (False when it cannot be read)."""
    hasher = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            for chunk in chunks_of(stream, _CHUNK):
                hasher.update(chunk)
    except OSError:
        return False
    return "sha256:" + hasher.hexdigest() == digest

