"""load_images: cached images back into the engine, sending only the layers it lacks (the
ground rules are in :mod:`layerkeep.cache.layers`)."""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerkeep.building.inline_cache import has_inline_cache
from layerkeep.cache.archive import LayerSource, legacy_archive
from layerkeep.cache.layers import mb, read_or_empty
from layerkeep.cache.manifest import Blob, CachedImage, Manifest
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CacheUnavailable, CorruptCache
from layerkeep.core.engine import Engine, image_content, image_layers
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.progress import MeterFactory, silent

CACHE_REPOSITORY = "layerkeep-cache"
_NOT_IN_TAG = re.compile(r"[^a-z0-9_.-]+")
# Chunks of a load archive prepared ahead of the engine (about a MB each).
LOAD_READ_AHEAD = 8


@dataclass
class LoadReport:
    """What ``load_images`` did.

    ``cache_sources`` names every cached image now in the engine, for the build's
    ``--cache-from``: its own tag, or its :func:`cache_reference` when that tag belongs
    to another image (those tags are in ``tags_left``). ``damaged`` lists the layers
    found damaged and dropped from the cache, which the next save writes again.
    """

    restored: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cache_sources: list[str] = field(default_factory=list)
    tags_left: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)
    bytes_read: int = 0
    cold: bool = False
    # The folder also holds a BuildKit cache export (see cache.buildkit_dir).
    buildkit_export: bool = False
    seconds: float = 0.0


def cache_reference(tag: str) -> str:
    """The internal name a cached image gets when ``tag`` already names another image."""
    slug = _NOT_IN_TAG.sub("-", tag.lower()).strip(".-")[:100]
    return f"{CACHE_REPOSITORY}:{slug}-{hashlib.sha256(tag.encode()).hexdigest()[:10]}"


def cache_sources(engine: Engine, images: Sequence[str]) -> list[str]:
    """The internal names (see ``cache_reference``) the engine holds for ``images``.

    For a build run apart from cache.load: add them to the ``--cache-from`` list.
    """
    return [cache_reference(i) for i in images if engine.image_id(cache_reference(i))]

def load_images(
    engine: Engine,
    cache: CacheDir,
    *,
    only: Collection[str] | None = None,
    log: Log = print,
    progress: MeterFactory = silent,
) -> LoadReport:
    """Restore every cached image the engine lacks; damaged entries are skipped with a warning.

    ``only`` limits it to those tags. Only the layers the engine lacks travel: they are
    checked and decompressed on a thread of their own, ahead of the engine reading them.
    ``progress`` shows the bytes read from the cache. A damaged blob is dropped from the
    manifest (when the folder is writable), so the next save writes it again.
    """
    started = time.monotonic()
    report = LoadReport()
    if not cache.exists():
        report.cold = True
        log(f"no cache at {cache.root}: this is a cold build")
        return report
    with cache.locked(write=False):
        manifest = read_or_empty(cache, log)
        report.buildkit_export = manifest.buildkit is not None
        loader = _Loader(engine, cache, manifest, report, log, progress)
        for tag, image in sorted(manifest.images.items()):
            if only is None or tag in only:
                loader.restore(tag, image)
        if report.damaged:
            _forget_damaged(cache, manifest, report.damaged, log)
    report.seconds = time.monotonic() - started
    log(
        f"restored {len(report.restored)} image(s) from {cache.root} "
        f"({mb(report.bytes_read)} read, {report.seconds:.1f} s); "
        f"{len(report.present)} already present, {len(report.failed)} skipped"
    )
    return report


def _forget_damaged(cache: CacheDir, manifest: Manifest, damaged: list[str], log: Log) -> None:
    manifest.forget(damaged)
    try:
        cache.write_manifest(manifest)
    except CacheUnavailable as error:
        log(f"warning: could not record the damaged layer(s) in the cache: {error.one_line()}")


@dataclass
class _Loader:
    """One load's state: the layers the engine has and what was found damaged."""

    engine: Engine
    cache: CacheDir
    manifest: Manifest
    report: LoadReport
    log: Log
    progress: MeterFactory = silent
    containerd: bool = False
    present_chains: set[str] = field(default_factory=set)
    # (layers, created) -> id of each local image: how the containerd store's images,
    # named by manifest digests, are recognised.
    local: dict[tuple[tuple[str, ...], str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.containerd = self.engine.uses_containerd_store()
        for attrs in self.engine.local_images():
            layers, created = image_content(attrs)
            self.local[layers, created] = str(attrs["Id"])
            if not self.containerd:
                self.present_chains.update(_chain_ids(layers))

    def restore(self, tag: str, image: CachedImage) -> None:
        """Make the engine hold ``image``, under ``tag`` unless that names another image."""
        local = self._find(tag, image)
        if local is not None:
            source = self._name(tag, image, local)
            self.report.present.append(tag)
        else:
            source = tag if self.engine.image_attrs(tag) is None else cache_reference(tag)
            try:
                self.report.bytes_read += self._load(tag, image, source)
            except CorruptCache as error:
                self.report.failed.append(tag)
                if error.digest:
                    self.report.damaged.append(error.digest)
                self.log(f"warning: skipped {tag}: {error.one_line()}")
                return
            except DockerOperationError as error:
                self.report.failed.append(tag)
                self.log(f"warning: skipped {tag}: the engine refused it: {error.message}")
                return
            self.report.restored.append(tag)
            self.present_chains |= set(_chain_ids(image.layers))
            self.local[image.layers, image.created] = source
        self.report.cache_sources.append(source)
        if source != tag:
            self.report.tags_left.append(tag)
            self.log(
                f"left {tag} alone: it names another image in the engine; the cached one "
                f"is {source} (a --cache-from source)"
            )

    def _find(self, tag: str, image: CachedImage) -> str | None:
        """A name or id the engine has for the cached image, or None."""
        if self.engine.image_id(image.id) is not None:
            return image.id
        for reference in (tag, cache_reference(tag)):
            attrs = self.engine.image_attrs(reference)
            if attrs is not None and _same(attrs, image):
                return reference
        return None if _exact_only(image) else self.local.get((image.layers, image.created))

    def _name(self, tag: str, image: CachedImage, local: str) -> str:
        """Tag a present image as ``tag`` if that is free; otherwise its internal name."""
        owner = self.engine.image_attrs(tag)
        if owner is not None and _same(owner, image):
            return tag
        target = tag if owner is None else cache_reference(tag)
        if local != target:
            self.engine.tag_image(local, target)
        return target

    def _load(self, tag: str, image: CachedImage, name: str) -> int:
        """Stream one image into `docker load` as ``name``; returns the compressed bytes read.

        Each blob's size and CRC-32 are checked as it is read (and its zstd checksum as
        it is decompressed): a damaged one ends the stream early, so the engine loads
        nothing, and raises CorruptCache.
        """
        travel: list[tuple[str, Blob | None]] = []
        for digest, chain in zip(image.layers, _chain_ids(image.layers), strict=True):
            if not self.containerd and chain in self.present_chains:
                travel.append((digest, None))
                continue
            blob = self.manifest.blobs.get(digest)
            if blob is None:
                raise CorruptCache(
                    f"layer {digest[:19]} is not in the cache (found damaged earlier)",
                    path=self.cache.root,
                )
            travel.append((digest, blob))
        total = sum(blob.stored for _, blob in travel if blob is not None)
        meter = self.progress(f"loading {tag}", total, "B")
        sources = [
            LayerSource(digest, 0, None)
            if blob is None
            else LayerSource(
                digest, blob.size, self.cache.read_blob(digest, blob, advance=meter.advance)
            )
            for digest, blob in travel
        ]
        try:
            archive = legacy_archive(image.config, sources, [name])
            self.engine.load_archive(read_ahead(archive, LOAD_READ_AHEAD), image=tag)
        finally:
            meter.close()
        return total


def read_ahead(chunks: Iterable[bytes], depth: int) -> Iterator[bytes]:
    """``chunks``, produced on a thread of their own up to ``depth`` ahead of the reader.

    What the producer raises is raised here, in order; a reader that stops early stops
    the producer.
    """
    ready: queue.Queue[tuple[bytes | None, BaseException | None]] = queue.Queue(depth)
    stop = threading.Event()

    def offer(item: tuple[bytes | None, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
            except queue.Full:
                continue
            return True
        return False

    def produce() -> None:
        try:
            for chunk in chunks:
                if not offer((chunk, None)):
                    return
            offer((None, None))
        except BaseException as error:  # handed to the reading thread, which raises it
            offer((None, error))

    thread = threading.Thread(target=produce, name="layerkeep-load", daemon=True)
    thread.start()
    try:
        while True:
            chunk, error = ready.get()
            if error is not None:
                raise error
            if chunk is None:
                return
            yield chunk
    finally:
        stop.set()
        thread.join()


def _same(attrs: dict[str, Any], image: CachedImage) -> bool:
    """Whether an engine's inspect record is the cached image (on either image store).

    An image with BuildKit inline cache is the cached one only by its exact config: the
    engine's own copy may lack results the cache completed (see build.inline_cache).
    """
    if attrs.get("Id") == image.id:
        return True
    if _exact_only(image):
        return False
    if attrs.get("Id") == image.engine_id:
        return True
    return image_layers(attrs) == image.layers and attrs.get("Created") == image.created


def _exact_only(image: CachedImage) -> bool:
    """A cached image whose inline cache was completed: only its own config will do."""
    return image.id != image.engine_id and has_inline_cache(json.loads(image.config))


def _chain_ids(layers: Iterable[str]) -> list[str]:
    """Chain ids, which name a layer together with everything below it."""
    chains: list[str] = []
    for digest in layers:
        if not chains:
            chains.append(digest)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {digest}".encode()).hexdigest())
    return chains

