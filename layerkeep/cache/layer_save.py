"""save_images: the engine's images into the cache folder, writing only new layers (the
ground rules are in :mod:`layerkeep.cache.layers`)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerkeep.building.inline_cache import (
    CACHE_KEY,
    complete,
    has_inline_cache,
    uncovered_layers,
)
from layerkeep.cache.archive import SavedImage, SkippedWrongly, image_id_of, read_saved
from layerkeep.cache.blob_writer import BlobWriter, compression_threads
from layerkeep.cache.layers import mb, read_or_empty
from layerkeep.cache.manifest import CachedImage, Manifest
from layerkeep.cache.store import CacheDir
from layerkeep.core.engine import Engine, image_layers
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.progress import MeterFactory, silent

# BuildKit's inline cache: a config key (and a label on some builders) that changes on
# every rebuild, even one that reused every step.
BUILDKIT_CACHE_KEY = CACHE_KEY


@dataclass
class SaveReport:
    """What ``save_images`` did.

    ``repaired`` lists images re-read although unchanged, because a blob of theirs was
    missing or had been found damaged (they are in ``saved`` too). ``engine_reads`` counts
    the `docker save` calls (one for all changed images, a second only when a layer left
    unread by its size turned out to be new).
    """

    saved: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    # Images whose BuildKit inline cache lacked results that the cached images had: the
    # cache keeps them completed (see build.inline_cache).
    completed: list[str] = field(default_factory=list)
    # Image -> its layers (indexes) no inline cache record covers even so: steps the next
    # machine will run again.
    uncovered: dict[str, list[int]] = field(default_factory=dict)
    layers_written: int = 0
    layers_verified: int = 0
    bytes_written: int = 0
    bytes_freed: int = 0
    engine_reads: int = 0
    bytes_read: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        """Nothing had changed, so nothing was read or written."""
        return not (self.saved or self.dropped)



def save_images(
    engine: Engine,
    cache: CacheDir,
    images: Sequence[str],
    *,
    level: int = 3,
    threads: int = 0,
    own_layers_from: Mapping[str, int] | None = None,
    keep: Collection[str] = (),
    log: Log = print,
    progress: MeterFactory = silent,
) -> SaveReport:
    """Make the cache hold exactly ``images`` as the engine has them now (and the cached
    copies of ``keep``, left as they are: the app's images where this builder keeps
    BuildKit's cache instead, for the engines of a mixed fleet that read images).

    A BuildKit image's inline cache is completed from the images cached before (see
    build.inline_cache), so that the next machine reuses every step this one did;
    ``own_layers_from`` (image -> index of its first layer above its base image) lets
    the report name the layers that still no record covers.

    An unchanged image (see :func:`unchanged`) costs one inspect and a stat per layer.
    All changed images (and those with a missing or damaged blob) are read with one
    `docker save`; a layer the cache has streams past unread, and the new ones are
    hashed and compressed (``threads`` zstd workers, 0 for one per core) on another
    thread while the stream is read on. Layers no kept image needs are removed
    afterwards. ``progress`` shows the bytes read from the engine.
    """
    started = time.monotonic()
    report = SaveReport()
    with cache.locked():
        cache.remove_leftovers()
        manifest = read_or_empty(cache, log)
        current = {image: engine.image_attrs(image) for image in images}
        report.missing = [image for image, attrs in current.items() if attrs is None]
        # An image the engine lacks this time keeps its cached copy rather than being lost.
        for tag in sorted(set(manifest.images) - set(images) - set(keep)):
            del manifest.images[tag]
            report.dropped.append(tag)
        changed: dict[str, Mapping[str, Any]] = {}
        for tag, attrs in current.items():
            cached = manifest.images.get(tag)
            if attrs is None:
                continue
            if cached is not None and unchanged(attrs, cached):
                if all(cache.blob_present(manifest, digest) for digest in cached.layers):
                    report.unchanged.append(tag)
                    continue
                report.repaired.append(tag)
            changed[tag] = attrs
        if changed:
            saver = _Saver(engine, cache, manifest, level, compression_threads(threads), report)
            saver.save(changed, progress)
            report.saved = list(changed)
        for tag, first in (own_layers_from or {}).items():
            kept = manifest.images.get(tag)
            gaps = uncovered_layers(json.loads(kept.config), first) if kept else []
            if kept and gaps and has_inline_cache(json.loads(kept.config)):
                report.uncovered[tag] = gaps
        if not report.skipped:
            manifest.prune()
            cache.write_manifest(manifest)
            report.bytes_freed = cache.remove_unreferenced(manifest)
    report.seconds = time.monotonic() - started
    _log_save(report, log)
    return report


def unchanged(attrs: Mapping[str, Any], cached: CachedImage) -> bool:
    """Whether the engine's image (its inspect record) is the cached one for the cache.

    The same id, or the same layers and the same config apart from builder cache
    metadata: BuildKit's inline cache (a config key that changes on every rebuild, even
    a fully cached one) and the history, which inspect does not show.
    """
    if attrs.get("Id") in (cached.id, cached.engine_id):
        return True
    if image_layers(attrs) != cached.layers:
        return False
    config = json.loads(cached.config)
    pairs = (
        ("Created", "created"), ("Architecture", "architecture"), ("Os", "os"),
        ("Variant", "variant"), ("Author", "author"),
    )
    if any((attrs.get(ours) or "") != (config.get(theirs) or "") for ours, theirs in pairs):
        return False
    return _run_config(attrs.get("Config")) == _run_config(config.get("config"))


def _run_config(config: Any) -> dict[str, Any]:
    """An image's run config without empty fields (inspect lists every field, configs
    only those set) and without BuildKit's cache label."""
    if not isinstance(config, Mapping):
        return {}
    kept = {key: value for key, value in config.items() if value not in (None, "", [], {}, False)}
    labels = {k: v for k, v in (kept.get("Labels") or {}).items() if k != BUILDKIT_CACHE_KEY}
    kept.pop("Labels", None)
    if labels:
        kept["Labels"] = labels
    return kept


def _log_save(report: SaveReport, log: Log) -> None:
    if report.completed:
        log(
            f"inline cache completed for {', '.join(report.completed)}: BuildKit leaves out "
            "the steps a build reused from an imported cache; the cached images had them"
        )
    for image, gaps in report.uncovered.items():
        log(f"warning: {describe_uncovered(image, gaps)}")
    for image in report.missing:
        log(f"warning: {image} is not in the engine, so it was not saved")
    for image in report.repaired:
        log(f"{image}: rewriting the layers the cache had lost or found damaged")
    if report.skipped:
        log(f"cache up to date ({len(report.unchanged)} images), nothing saved")
    else:
        log(
            f"saved {len(report.saved)} image(s) ({', '.join(report.saved) or 'none'}): "
            f"{report.layers_written} new layer(s), {mb(report.bytes_written)} written, "
            f"{report.layers_verified} reused after a check, "
            f"{mb(report.bytes_freed)} freed, {report.seconds:.1f} s"
        )

@dataclass
class _Saver:
    """One save's state: where layers go and which stored blobs passed their check."""

    engine: Engine
    cache: CacheDir
    manifest: Manifest
    level: int
    threads: int
    report: SaveReport
    verified: set[str] = field(default_factory=set)
    # Cached layers of the images being saved, by uncompressed size: what a member of
    # that size may be (the archive's manifest settles it).
    by_size: dict[int, list[str]] = field(default_factory=dict)
    strict: bool = False
    writer: BlobWriter | None = None

    def save(self, changed: Mapping[str, Mapping[str, Any]], progress: MeterFactory) -> None:
        """Read every changed image with one `docker save`; store configs and new layers."""
        for attrs in changed.values():
            for digest in image_layers(attrs):
                blob = self.manifest.blobs.get(digest)
                if blob is not None and digest not in self.by_size.get(blob.size, []):
                    self.by_size.setdefault(blob.size, []).append(digest)
        tags = list(changed)
        # The previous cache's configs: what a build that reused their steps lost.
        donors = [json.loads(image.config) for image in self.manifest.images.values()]
        try:
            saved = self._read(tags, progress)
        except SkippedWrongly:
            # A new layer had the size of a cached one (never seen): read them all.
            self.strict = True
            saved = self._read(tags, progress)
        for tag, attrs in changed.items():
            image = _image_for(saved, tag, str(attrs["Id"]))
            config = _completed(image.config, donors)
            if config != image.config:
                self.report.completed.append(tag)
            self.manifest.images[tag] = CachedImage(
                image_id_of(config), config, image.layers, str(attrs["Id"])
            )
            self.manifest.names.update(zip(image.paths, image.layers, strict=True))

    def _read(self, tags: Sequence[str], progress: MeterFactory) -> list[SavedImage]:
        label = ", ".join(tags)
        meter = progress(f"saving {label}", None, "B")

        def advance(amount: int) -> None:
            self.report.bytes_read += amount
            meter.advance(amount)

        self.report.engine_reads += 1
        try:
            with BlobWriter(
                self.cache, level=self.level, threads=self.threads, sound=self.verified
            ) as self.writer:
                return read_saved(
                    self.engine.save_images(tags), self, image=label, advance=advance
                )
        finally:
            self.writer = None
            meter.close()

    def cached(self, name: str, size: int) -> Collection[str]:
        """The sound cached layers the archive member ``name`` may be, by name or size."""
        digest = self.manifest.names.get(name)
        if digest is None and name.startswith("blobs/sha256/"):
            # OCI blobs are named by their digest: an uncompressed layer's is its diff id.
            digest = "sha256:" + name.rpartition("/")[2]
        if digest is not None and self.has(digest):
            return [digest]
        if self.strict:
            return []
        return [d for d in self.by_size.get(size, []) if self.has(d)]

    def has(self, digest: str) -> bool:
        """Whether a layer is stored and passes its check (once per save)."""
        if digest in self.verified:
            return True
        if digest not in self.manifest.blobs:
            return False
        if not self.cache.has_blob(self.manifest, digest):
            self.manifest.forget([digest])
            return False
        self.verified.add(digest)
        self.report.layers_verified += 1
        return True

    def store(self, name: str, pieces: Iterable[bytes]) -> Callable[[], str]:
        """Hand a new layer to the compressing thread; the call returned waits for it."""
        assert self.writer is not None
        stored = self.writer.write(pieces)

        def digest() -> str:
            found, blob = stored()
            if found not in self.verified:
                self.manifest.blobs[found] = blob
                self.verified.add(found)
                self.report.layers_written += 1
                self.report.bytes_written += blob.stored
            return found

        return digest


def describe_uncovered(image: str, gaps: Sequence[int]) -> str:
    """The line for an image whose inline cache misses some of its own layers."""
    shown = ", ".join(str(index) for index in gaps[:5]) + (" ..." if len(gaps) > 5 else "")
    return (
        f"{image}: its inline cache covers no step that made layer(s) {shown}; the next "
        "machine rebuilds from there (BuildKit leaves out steps reused from an imported "
        "cache, and no cached image had them)"
    )


def _completed(config: str, donors: Sequence[Mapping[str, Any]]) -> str:
    """``config`` (exact text) with its inline cache completed from ``donors``; the same
    text when there was nothing to add."""
    parsed = json.loads(config)
    if not has_inline_cache(parsed):
        return config
    done = complete(parsed, donors)
    return config if done == parsed else json.dumps(done, separators=(",", ":"))


def _image_for(saved: Sequence[SavedImage], tag: str, engine_id: str) -> SavedImage:
    """The archive's image for ``tag``: by its tag, or by its id (an id or digest given)."""
    wanted = {tag, f"{tag}:latest"}
    for image in saved:
        if wanted & set(image.repo_tags):
            return image
    for image in saved:
        if image_id_of(image.config) == engine_id:
            return image
    raise DockerOperationError(f"docker save {tag} gave no image for it", image=tag)
