"""Save images from the engine into the cache folder, and restore what the engine lacks.

The cache works with either image store: it reads both `docker save` layouts (see
``archive``) and keys layers by diff id, and it loads through the legacy layout, which
every engine accepts. An image is named by its config digest (its id on the classic
store; the containerd store names it by a manifest digest, recorded as ``engine_id``).

A load never moves a tag the engine already has for another image: the cached image then
gets an internal name (:func:`cache_reference`), listed in ``LoadReport.cache_sources``
for the build to use as ``--cache-from``.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerkeep.cache.archive import LayerSource, image_id_of, legacy_archive, read_saved
from layerkeep.cache.store import (
    CachedImage,
    CacheDir,
    CacheUnavailable,
    CorruptCache,
    Manifest,
    Readable,
)
from layerkeep.cache.tarstream import reader_over
from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError

Log = Callable[[str], None]
CACHE_REPOSITORY = "layerkeep-cache"
_NOT_IN_TAG = re.compile(r"[^a-z0-9_.-]+")


@dataclass
class SaveReport:
    """What ``save_images`` did.

    ``repaired`` lists images re-read although unchanged, because a blob of theirs was
    missing or had been found damaged (they are in ``saved`` too).
    """

    saved: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    layers_written: int = 0
    layers_verified: int = 0
    bytes_written: int = 0
    bytes_freed: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        """Nothing had changed, so nothing was read or written."""
        return not (self.saved or self.dropped)


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


def save_images(
    engine: Engine, cache: CacheDir, images: Sequence[str], *, level: int = 3, log: Log = print
) -> SaveReport:
    """Make the cache hold exactly ``images`` as the engine has them now.

    Unchanged images cost one inspect and a stat per layer; a changed image (or one with
    a missing or damaged blob) is read with `docker save`, every layer the cache already
    has is checked (size and CRC-32) before it is reused, and the others are compressed
    and written. Layers no kept image needs are removed afterwards.
    """
    started = time.monotonic()
    report = SaveReport()
    with cache.locked():
        cache.remove_leftovers()
        manifest = _read_or_empty(cache, log)
        current = {image: engine.image_id(image) for image in images}
        report.missing = [image for image, image_id in current.items() if image_id is None]
        # An image the engine lacks this time keeps its cached copy rather than being lost.
        for tag in sorted(set(manifest.images) - set(images)):
            del manifest.images[tag]
            report.dropped.append(tag)
        saver = _Saver(engine, cache, manifest, level, report)
        for tag, image_id in current.items():
            cached = manifest.images.get(tag)
            if image_id is None:
                continue
            if cached is not None and image_id in (cached.id, cached.engine_id):
                if all(cache.blob_present(manifest, digest) for digest in cached.layers):
                    report.unchanged.append(tag)
                    continue
                report.repaired.append(tag)
            saver.save(tag, image_id)
            report.saved.append(tag)
        if not report.skipped:
            manifest.prune()
            cache.write_manifest(manifest)
            report.bytes_freed = cache.remove_unreferenced(manifest)
    report.seconds = time.monotonic() - started
    _log_save(report, log)
    return report


def _log_save(report: SaveReport, log: Log) -> None:
    for image in report.missing:
        log(f"warning: {image} is not in the engine, so it was not saved")
    for image in report.repaired:
        log(f"{image}: rewriting the layers the cache had lost or found damaged")
    if report.skipped:
        log(f"cache up to date ({len(report.unchanged)} images), nothing saved")
    else:
        log(
            f"saved {len(report.saved)} image(s) ({', '.join(report.saved) or 'none'}): "
            f"{report.layers_written} new layer(s), {_mb(report.bytes_written)} written, "
            f"{report.layers_verified} reused after a check, "
            f"{_mb(report.bytes_freed)} freed, {report.seconds:.1f} s"
        )


def load_images(engine: Engine, cache: CacheDir, *, log: Log = print) -> LoadReport:
    """Restore every cached image the engine lacks; damaged entries are skipped with a warning.

    A damaged blob is dropped from the manifest (when the folder is writable), so the
    next save writes it again.
    """
    started = time.monotonic()
    report = LoadReport()
    if not cache.exists():
        report.cold = True
        log(f"no cache at {cache.root}: this is a cold build")
        return report
    with cache.locked(write=False):
        manifest = _read_or_empty(cache, log)
        loader = _Loader(engine, cache, manifest, report, log)
        for tag, image in sorted(manifest.images.items()):
            loader.restore(tag, image)
        if report.damaged:
            _forget_damaged(cache, manifest, report.damaged, log)
    report.seconds = time.monotonic() - started
    log(
        f"restored {len(report.restored)} image(s) from {cache.root} "
        f"({_mb(report.bytes_read)} read, {report.seconds:.1f} s); "
        f"{len(report.present)} already present, {len(report.failed)} skipped"
    )
    return report


def _forget_damaged(cache: CacheDir, manifest: Manifest, damaged: list[str], log: Log) -> None:
    manifest.forget(damaged)
    try:
        cache.write_manifest(manifest)
    except CacheUnavailable as error:
        log(f"warning: could not record the damaged layer(s) in the cache: {error.one_line()}")


def _read_or_empty(cache: CacheDir, log: Log) -> Manifest:
    try:
        return cache.read_manifest()
    except CorruptCache as error:
        log(f"warning: ignoring the cache: {error.message}")
        return Manifest()


@dataclass
class _Saver:
    """One save's state: where layers go and which stored blobs passed their check."""

    engine: Engine
    cache: CacheDir
    manifest: Manifest
    level: int
    report: SaveReport
    verified: set[str] = field(default_factory=set)

    def save(self, tag: str, engine_id: str) -> None:
        """Read one image with `docker save` and store its config and new layers."""
        saved = read_saved(reader_over(self.engine.save_image(tag)), self, image=tag)
        mine = [image for image in saved if tag in image.repo_tags] or saved
        if not mine:
            raise DockerOperationError(f"docker save {tag} gave no image", image=tag)
        image = mine[0]
        self.manifest.images[tag] = CachedImage(
            image_id_of(image.config), image.config, image.layers, engine_id
        )

    def known(self, name: str) -> str | None:
        """The diff id of an archive member already stored, if its blob passes the check."""
        digest = self.manifest.names.get(name)
        if digest is None and name.startswith("blobs/sha256/"):
            # OCI blobs are named by their digest: an uncompressed layer's is its diff id.
            digest = "sha256:" + name.rpartition("/")[2]
        if digest is None or digest not in self.manifest.blobs:
            return None
        if digest not in self.verified:
            if not self.cache.has_blob(self.manifest, digest):
                self.manifest.forget([digest])
                return None
            self.verified.add(digest)
            self.report.layers_verified += 1
        return digest

    def store(self, name: str, content: Readable) -> str:
        """Compress a layer into the cache; it was hashed and checksummed as it was written."""
        digest, blob = self.cache.store_blob(content, level=self.level, sound=self.verified)
        self.manifest.names[name] = digest
        if digest not in self.verified:
            self.manifest.blobs[digest] = blob
            self.verified.add(digest)
            self.report.layers_written += 1
            self.report.bytes_written += blob.stored
        return digest


@dataclass
class _Loader:
    """One load's state: the layers the engine has and what was found damaged."""

    engine: Engine
    cache: CacheDir
    manifest: Manifest
    report: LoadReport
    log: Log
    containerd: bool = False
    present_chains: set[str] = field(default_factory=set)
    # (layers, created) -> id of each local image: how the containerd store's images,
    # named by manifest digests, are recognised.
    local: dict[tuple[tuple[str, ...], str], str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.containerd = self.engine.uses_containerd_store()
        for attrs in self.engine.local_images():
            layers = tuple(str(d) for d in (attrs.get("RootFS") or {}).get("Layers") or [])
            self.local[layers, str(attrs.get("Created", ""))] = str(attrs["Id"])
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
        return self.local.get((image.layers, image.created))

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
        """Stream one image into `docker load` as ``name``; returns the compressed bytes read."""
        sources: list[LayerSource] = []
        read = 0
        for digest, chain in zip(image.layers, _chain_ids(image.layers), strict=True):
            if not self.containerd and chain in self.present_chains:
                sources.append(LayerSource(digest, 0, None))
                continue
            blob = self.manifest.blobs.get(digest)
            if blob is None:
                raise CorruptCache(
                    f"layer {digest[:19]} is not in the cache (found damaged earlier)",
                    path=self.cache.root,
                )
            if not self.cache.has_blob(self.manifest, digest):
                path = self.cache.blob_path(blob)
                raise CorruptCache(
                    f"{path} is damaged (its size or CRC-32 differs from the manifest's)",
                    path=path,
                    digest=digest,
                )
            read += blob.stored
            sources.append(LayerSource(digest, blob.size, self.cache.read_blob(digest, blob)))
        self.engine.load_archive(legacy_archive(image.config, sources, [name]), image=tag)
        return read


def _same(attrs: dict[str, Any], image: CachedImage) -> bool:
    """Whether an engine's inspect record is the cached image (on either image store)."""
    if attrs.get("Id") in (image.id, image.engine_id):
        return True
    layers = (attrs.get("RootFS") or {}).get("Layers") or []
    return list(layers) == list(image.layers) and attrs.get("Created") == image.created


def _chain_ids(layers: Iterable[str]) -> list[str]:
    """Chain ids, which name a layer together with everything below it."""
    chains: list[str] = []
    for digest in layers:
        if not chains:
            chains.append(digest)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {digest}".encode()).hexdigest())
    return chains


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
