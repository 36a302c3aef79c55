"""The layer cache: images saved from the engine into the cache folder, restored to it.

The cache works with either image store: it reads both `docker save` layouts (see
``archive``) and keys layers by diff id, and it loads through the legacy layout, which
every engine accepts. An image is named by its config digest (its id on the classic
store; the containerd store names it by a manifest digest, recorded as ``engine_id``).

A load never moves a tag the engine already has for another image: the cached image then
gets an internal name (:func:`~layerkeep.cache.layer_load.cache_reference`), listed in
``LoadReport.cache_sources`` for the build to use as ``--cache-from``.

Saving is :mod:`layerkeep.cache.layer_save`, restoring :mod:`layerkeep.cache.layer_load`;
both read the manifest as :func:`read_or_empty` does.
"""

from __future__ import annotations

from layerkeep.cache.manifest import Manifest
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CorruptCache
from layerkeep.core.log import Log


def read_or_empty(cache: CacheDir, log: Log) -> Manifest:
    """The cache's manifest; an empty one, with a warning, when it is damaged."""
    try:
        return cache.read_manifest()
    except CorruptCache as error:
        log(f"warning: ignoring the cache: {error.message}")
        return Manifest()


def mb(size: int) -> str:
    """``size`` bytes in megabytes, as the cache's lines give them."""
    return f"{size / 1e6:.1f} MB"
