"""The cache folder: layers stored once each (zstd, by content digest) and a manifest.

Layout::

    manifest.json          images (tag -> id, config, layer digests) and blobs
    blobs/<hex>.zst        one compressed layer tar per diff id, shared by every image
    .lock                  taken while a save or load runs

Every file is written to a temporary name, fsynced and renamed, and the manifest is
replaced last: an interrupted save leaves the previous cache whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from layerkeep.core.errors import LayerkeepError

FORMAT = "layerkeep-cache/1"
MANIFEST = "manifest.json"
BLOBS = "blobs"
TEMP_PREFIX = ".tmp-"
CHUNK = 1 << 20


class CorruptCache(LayerkeepError):
    """A cache file is missing, truncated, damaged or not ours; it names the file."""

    def __init__(self, message: str, *, path: Path) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Blob:
    """One stored layer: its file, uncompressed size and size on disk."""

    file: str
    size: int
    stored: int


@dataclass(frozen=True)
class CachedImage:
    """An image as the cache keeps it: enough to rebuild a `docker load` archive."""

    id: str
    config: str
    layers: tuple[str, ...]


@dataclass
class Manifest:
    """What the cache holds."""

    images: dict[str, CachedImage] = field(default_factory=dict)
    blobs: dict[str, Blob] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def prune(self) -> None:
        """Forget layers no image needs."""
        needed = {digest for image in self.images.values() for digest in image.layers}
        self.blobs = {d: b for d, b in self.blobs.items() if d in needed}
        self.names = {n: d for n, d in self.names.items() if d in self.blobs}

    def to_json(self) -> str:
        """The manifest file's text."""
        return json.dumps(
            {
                "format": FORMAT,
                "images": {
                    tag: {"id": i.id, "config": i.config, "layers": list(i.layers)}
                    for tag, i in sorted(self.images.items())
                },
                "blobs": {
                    digest: {"file": b.file, "size": b.size, "stored": b.stored}
                    for digest, b in sorted(self.blobs.items())
                },
                "names": dict(sorted(self.names.items())),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, path: Path) -> Manifest:
        """Parse a manifest; anything unexpected is a CorruptCache naming the file."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise CorruptCache(f"{path} is not a layerkeep cache manifest", path=path)
            images = {
                str(tag): CachedImage(str(i["id"]), str(i["config"]), tuple(map(str, i["layers"])))
                for tag, i in data["images"].items()
            }
            blobs = {
                str(d): Blob(str(b["file"]), int(b["size"]), int(b["stored"]))
                for d, b in data["blobs"].items()
            }
            names = {str(k): str(v) for k, v in data.get("names", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptCache(f"{path} is damaged ({error})", path=path) from None
        return cls(images, blobs, names)


@dataclass(frozen=True)
class CacheDir:
    """A cache folder on disk."""

    root: Path

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.root / MANIFEST

    def exists(self) -> bool:
        """Whether a manifest was ever written here."""
        return self.manifest_path.is_file()

    def read_manifest(self) -> Manifest:
        """The manifest, or an empty one when there is none; CorruptCache when damaged."""
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return Manifest()
        except (OSError, UnicodeDecodeError) as error:
            path = self.manifest_path
            raise CorruptCache(f"cannot read {path}: {error}", path=path) from None
        return Manifest.from_json(text, path=self.manifest_path)

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace the manifest atomically, after the blobs it names are durable."""
        if (self.root / BLOBS).is_dir():
            _fsync_folder(self.root / BLOBS)
        with self._atomic(self.manifest_path) as stream:
            stream.write(manifest.to_json().encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock, so two jobs sharing one cache take turns."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def blob_path(self, blob: Blob) -> Path:
        """The file of a stored layer."""
        return self.root / blob.file

    def has_blob(self, manifest: Manifest, digest: str) -> bool:
        """Whether a layer is stored whole (its file has the recorded size)."""
        blob = manifest.blobs.get(digest)
        if blob is None:
            return False
        try:
            return self.blob_path(blob).stat().st_size == blob.stored
        except OSError:
            return False

    def store_blob(self, stream: IO[bytes], *, level: int) -> tuple[str, Blob, bool]:
        """Compress a layer from ``stream`` into the store; returns (digest, blob, written).

        The digest is that of the uncompressed bytes, which for a layer tar is its diff
        id; a layer already stored is not written again.
        """
        blobs = self.root / BLOBS
        blobs.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        size = 0
        compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
        with _temporary(blobs) as (temp_path, raw):
            with compressor.stream_writer(raw, closefd=False) as writer:
                while chunk := stream.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    writer.write(chunk)
            raw.flush()
            os.fsync(raw.fileno())
            name = f"sha256:{digest.hexdigest()}"
            final = blobs / f"{digest.hexdigest()}.zst"
            stored = raw.tell()
            written = not final.is_file()
            if written:
                temp_path.rename(final)
        blob = Blob(f"{BLOBS}/{final.name}", size, final.stat().st_size if not written else stored)
        return name, blob, written

    def read_blob(self, digest: str, blob: Blob) -> Iterator[bytes]:
        """The uncompressed layer, in chunks; CorruptCache when the file is damaged."""
        path = self.blob_path(blob)
        total = 0
        try:
            with path.open("rb") as raw:
                reader = zstandard.ZstdDecompressor().stream_reader(raw)
                while chunk := reader.read(CHUNK):
                    total += len(chunk)
                    yield chunk
        except (OSError, zstandard.ZstdError) as error:
            raise CorruptCache(f"{path} is damaged: {error}", path=path) from None
        if total != blob.size:
            raise CorruptCache(
                f"{path} is truncated ({total} of {blob.size} bytes, layer {digest[:19]})",
                path=path,
            )

    def remove_leftovers(self) -> None:
        """Delete temporary files an interrupted save left behind (hold the lock)."""
        for folder in (self.root, self.root / BLOBS):
            for path in folder.glob(f"{TEMP_PREFIX}*"):
                path.unlink()

    def remove_unreferenced(self, manifest: Manifest) -> int:
        """Delete blob files the manifest does not name; returns the bytes freed."""
        keep = {self.root / blob.file for blob in manifest.blobs.values()}
        freed = 0
        blob_dir = self.root / BLOBS
        for path in blob_dir.iterdir() if blob_dir.is_dir() else ():
            if path not in keep:
                freed += path.stat().st_size
                path.unlink()
        return freed

    @contextlib.contextmanager
    def _atomic(self, target: Path) -> Iterator[IO[bytes]]:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _temporary(target.parent) as (temp_path, stream):
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
            temp_path.replace(target)
        _fsync_folder(target.parent)


@contextlib.contextmanager
def _temporary(folder: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A temporary file in ``folder``, removed unless the caller renamed it."""
    path = folder / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with path.open("xb") as stream:
            yield path, stream
    finally:
        path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def config_layers(config: Mapping[str, Any]) -> list[str]:
    """The diff ids an image config lists, in order."""
    return [str(d) for d in config.get("rootfs", {}).get("diff_ids", [])]
