"""Save images from the engine into the cache folder, and restore what the engine lacks."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO

import docker.errors
import requests.exceptions

from layerkeep.cache.store import (
    CachedImage,
    CacheDir,
    CorruptCache,
    Manifest,
    config_layers,
)
from layerkeep.cache.tarstream import Entry, reader_over, resolve_link, write_tar
from layerkeep.core.engine import Engine, checked_stream
from layerkeep.core.errors import DockerOperationError

Log = Callable[[str], None]
_SMALL = 4 << 20  # configs and manifests; layers are larger or named layer.tar/blobs


@dataclass
class SaveReport:
    """What ``save_images`` did."""

    saved: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    layers_written: int = 0
    bytes_written: int = 0
    bytes_freed: int = 0
    seconds: float = 0.0

    @property
    def skipped(self) -> bool:
        """Nothing had changed, so nothing was read or written."""
        return not (self.saved or self.dropped)


@dataclass
class LoadReport:
    """What ``load_images`` did."""

    restored: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bytes_read: int = 0
    cold: bool = False
    seconds: float = 0.0


def save_images(
    engine: Engine, cache: CacheDir, images: Sequence[str], *, level: int = 3, log: Log = print
) -> SaveReport:
    """Make the cache hold exactly ``images`` as the engine has them now.

    Unchanged images cost one inspect each; a changed image is read with `docker save`
    and only layers the cache lacks are compressed and written. Layers no kept image
    needs are removed afterwards, so the cache does not grow build after build.
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
            if cached is not None and cached.id == image_id:
                report.unchanged.append(tag)
            else:
                saver.save(tag)
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
    if report.skipped:
        log(f"cache up to date ({len(report.unchanged)} images), nothing saved")
    else:
        log(
            f"saved {len(report.saved)} image(s) ({', '.join(report.saved) or 'none'}): "
            f"{report.layers_written} new layer(s), {_mb(report.bytes_written)} written, "
            f"{_mb(report.bytes_freed)} freed, {report.seconds:.1f} s"
        )


def load_images(engine: Engine, cache: CacheDir, *, log: Log = print) -> LoadReport:
    """Restore every cached image the engine lacks; damaged entries are skipped with a warning."""
    started = time.monotonic()
    report = LoadReport()
    if not cache.exists():
        report.cold = True
        log(f"no cache at {cache.root}: this is a cold build")
        return report
    with cache.locked():
        manifest = _read_or_empty(cache, log)
        present_chains = _present_chains(engine)
        for tag, image in sorted(manifest.images.items()):
            if engine.image_id(image.id) is not None:
                if engine.image_id(tag) != image.id:
                    repository, _, name = tag.rpartition(":")
                    engine.api.tag(image.id, repository, name)
                report.present.append(tag)
                continue
            try:
                report.bytes_read += _load_one(engine, cache, manifest, tag, present_chains)
            except CorruptCache as error:
                report.failed.append(tag)
                log(f"warning: skipped {tag}: {error.message}")
                continue
            except DockerOperationError as error:
                report.failed.append(tag)
                log(f"warning: skipped {tag}: the engine refused it: {error.message}")
                continue
            report.restored.append(tag)
            present_chains |= set(_chain_ids(image.layers))
    report.seconds = time.monotonic() - started
    log(
        f"restored {len(report.restored)} image(s) from {cache.root} "
        f"({_mb(report.bytes_read)} read, {report.seconds:.1f} s); "
        f"{len(report.present)} already present, {len(report.failed)} skipped"
    )
    return report


def _read_or_empty(cache: CacheDir, log: Log) -> Manifest:
    try:
        return cache.read_manifest()
    except CorruptCache as error:
        log(f"warning: ignoring the cache: {error.message}")
        return Manifest()


@dataclass
class _Saver:
    """One save's state: where layers go and what has been written."""

    engine: Engine
    cache: CacheDir
    manifest: Manifest
    level: int
    report: SaveReport

    def save(self, tag: str) -> None:
        """Read one image with `docker save` and store its config and new layers."""
        digests: dict[str, str] = {}
        links: dict[str, str] = {}
        small: dict[str, bytes] = {}
        try:
            chunks = self.engine.api.get_image(tag, chunk_size=1 << 20)
            with tarfile.open(fileobj=reader_over(chunks), mode="r|") as archive:
                for member in archive:
                    if member.issym():
                        links[member.name] = resolve_link(member)
                    elif member.isfile() and _is_layer(member):
                        known = self.manifest.names.get(member.name)
                        if known and self.cache.has_blob(self.manifest, known):
                            digests[member.name] = known
                        else:
                            stream = _reader(archive.extractfile(member))
                            digests[member.name] = self._store(member.name, stream)
                    elif member.isfile():
                        small[member.name] = _reader(archive.extractfile(member)).read()
        except (docker.errors.APIError, requests.exceptions.RequestException) as error:
            raise DockerOperationError(f"docker save {tag} failed: {error}", image=tag) from None
        entry = json.loads(small["manifest.json"])[0]
        config_text = small[entry["Config"]].decode()
        layers = config_layers(json.loads(config_text))
        for index, listed in enumerate(entry["Layers"]):
            path = links.get(listed, listed)
            if path not in digests and path in small:
                # A layer small enough to have been read into memory.
                digests[path] = self._store(path, io.BytesIO(small[path]))
            if digests.get(path) != layers[index]:
                raise DockerOperationError(
                    f"docker save {tag}: layer {index} does not match its config", image=tag
                )
        image_id = "sha256:" + hashlib.sha256(config_text.encode()).hexdigest()
        self.manifest.images[tag] = CachedImage(image_id, config_text, tuple(layers))

    def _store(self, name: str, stream: IO[bytes]) -> str:
        digest, blob, written = self.cache.store_blob(stream, level=self.level)
        self.manifest.blobs[digest] = blob
        self.manifest.names[name] = digest
        if written:
            self.report.layers_written += 1
            self.report.bytes_written += blob.stored
        return digest


def _load_one(
    engine: Engine, cache: CacheDir, manifest: Manifest, tag: str, present_chains: set[str]
) -> int:
    """Stream one image into `docker load`; returns the compressed bytes read."""
    image = manifest.images[tag]
    for digest in image.layers:
        blob = manifest.blobs.get(digest)
        if blob is None:
            raise CorruptCache(f"layer {digest[:19]} is not in the cache", path=cache.root)
        if not cache.has_blob(manifest, digest):
            path = cache.blob_path(blob)
            raise CorruptCache(f"{path} is missing or truncated", path=path)
    entries: list[Entry] = []
    read = 0
    for digest, chain in zip(image.layers, _chain_ids(image.layers), strict=True):
        name = f"{digest.removeprefix('sha256:')}/layer.tar"
        if chain in present_chains:
            # `docker load` never opens a layer whose chain the engine already has.
            entries.append(Entry(name, 0, ()))
            continue
        blob = manifest.blobs[digest]
        read += blob.stored
        entries.append(Entry(name, blob.size, cache.read_blob(digest, blob)))
    config_name = f"{image.id.removeprefix('sha256:')}.json"
    listing = [{"Config": config_name, "RepoTags": [tag], "Layers": [e.name for e in entries]}]
    load_manifest = json.dumps(listing).encode()
    config = image.config.encode()
    entries[:0] = [
        Entry("manifest.json", len(load_manifest), [load_manifest]),
        Entry(config_name, len(config), [config]),
    ]
    try:
        stream = engine.api.load_image(write_tar(entries))
        for _ in checked_stream(stream, action="docker load", image=tag):
            pass
    except (docker.errors.APIError, requests.exceptions.RequestException) as error:
        if isinstance(error.__context__, CorruptCache):
            raise error.__context__ from None
        raise DockerOperationError(f"docker load {tag} failed: {error}", image=tag) from None
    return read


def _chain_ids(layers: Iterable[str]) -> list[str]:
    """Chain ids, which name a layer together with everything below it."""
    chains: list[str] = []
    for digest in layers:
        if not chains:
            chains.append(digest)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {digest}".encode()).hexdigest())
    return chains


def _present_chains(engine: Engine) -> set[str]:
    """Chain ids of every layer of every image in the engine."""
    chains: set[str] = set()
    for summary in engine.api.images(all=True):
        attrs = engine.image_attrs(summary["Id"])
        if attrs:
            chains.update(_chain_ids(attrs.get("RootFS", {}).get("Layers", [])))
    return chains


def _is_layer(member: tarfile.TarInfo) -> bool:
    return member.name.endswith("/layer.tar") or member.size > _SMALL


def _reader(stream: IO[bytes] | None) -> IO[bytes]:
    if stream is None:
        raise DockerOperationError("docker save produced an unreadable archive member")
    return stream


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"

