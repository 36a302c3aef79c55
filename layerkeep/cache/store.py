"""The cache folder: layers stored once each (zstd, by content digest) and a manifest
(see :mod:`layerkeep.cache.layout`).

A blob is checked three ways, from cheap to thorough: its size on disk (a stat, for
images a save leaves alone), a CRC-32 of the stored file recorded when it was written
(before a save reuses it or a load sends it: about 7 GB/s of compressed bytes), and the
zstd frame checksum and length of its content (while a load decompresses it, for free).
A blob that fails is dropped from the manifest, so the next save writes it again.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import zstandard

from layerkeep.cache.layout import BLOBS, CHUNK, LOCK, MANIFEST
from layerkeep.cache.manifest import Blob, Manifest
from layerkeep.cache.store_errors import CacheUnavailable, CorruptCache, faults, unavailable
from layerkeep.core.atomic import TEMP_PREFIX, atomic_write, fsync_folder


@dataclass(frozen=True)
class CacheDir:
    """A cache folder on disk."""

    root: Path

    @property
    def manifest_path(self) -> Path:
        """Where the manifest lives."""
        return self.root / MANIFEST

    def exists(self) -> bool:
        """Whether a manifest was ever written here; CacheUnavailable if the path is a file."""
        if self.root.exists() and not self.root.is_dir():
            raise unavailable(OSError(errno.ENOTDIR, "not a folder"), self.root)
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
        with faults(self.root):
            if (self.root / BLOBS).is_dir():
                fsync_folder(self.root / BLOBS)
            atomic_write(self.manifest_path, manifest.to_json().encode(), mode=0o644)

    @contextlib.contextmanager
    def locked(self, *, write: bool = True) -> Iterator[None]:
        """Hold the folder's lock, so two jobs sharing one cache take turns.

        A reader (``write=False``) of a read-only folder takes the lock if the file is
        there and goes on without it otherwise: nobody can be writing such a folder.
        """
        lock = self._open_lock(write=write)
        if lock is None:
            yield
            return
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _open_lock(self, *, write: bool) -> IO[bytes] | None:
        # Never through a link: a job sharing the folder must not make us write elsewhere.
        path = self.root / LOCK
        try:
            with faults(self.root):
                if write:
                    self.root.mkdir(parents=True, exist_ok=True)
                    if not self.root.is_dir():
                        raise unavailable(OSError(errno.ENOTDIR, "not a folder"), self.root)
                return _open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except CacheUnavailable:
            if write:
                raise
        try:
            return _open_nofollow(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise unavailable(error, path) from None

    def blob_path(self, blob: Blob) -> Path:
        """The file of a stored layer."""
        return self.root / blob.file

    def blob_present(self, manifest: Manifest, digest: str) -> bool:
        """The cheap check: the manifest lists the layer and its file has the stored size."""
        blob = manifest.blobs.get(digest)
        if blob is None:
            return False
        try:
            return self.blob_path(blob).stat().st_size == blob.stored
        except OSError:
            return False

    def has_blob(self, manifest: Manifest, digest: str) -> bool:
        """Whether a layer is stored whole: its file has the recorded size and CRC-32."""
        blob = manifest.blobs.get(digest)
        if blob is None:
            return False
        try:
            return crc32(self.blob_path(blob)) == (blob.stored, blob.check)
        except OSError:
            return False

    def read_blob(
        self, digest: str, blob: Blob, *, advance: Callable[[int], None] = lambda _: None
    ) -> Iterator[bytes]:
        """The uncompressed layer, in chunks, its file checked as it is read.

        The file's size and CRC-32 must be the manifest's, and its zstd checksum and
        length right: else CorruptCache, raised before the last chunk is given out.
        ``advance`` is told the compressed bytes read.
        """
        path = self.blob_path(blob)
        total = 0
        try:
            with path.open("rb", buffering=0) as raw:
                checked = _CheckedReader(raw, advance)
                # Anything with read() will do: zstandard only calls that.
                reader = zstandard.ZstdDecompressor().stream_reader(
                    cast(IO[bytes], checked), read_size=CHUNK
                )
                held = b""
                while chunk := reader.read(CHUNK):
                    total += len(chunk)
                    if held:
                        yield held
                    held = chunk
                # Whatever follows the frame is read too: it belongs to the CRC-32.
                while checked.read(CHUNK):
                    pass
                if (checked.size, checked.check) != (blob.stored, blob.check):
                    raise CorruptCache(
                        f"{path} is damaged (its size or CRC-32 differs from the manifest's)",
                        path=path,
                        digest=digest,
                    )
                if total != blob.size:
                    raise CorruptCache(
                        f"{path} is truncated ({total} of {blob.size} bytes, "
                        f"layer {digest[:19]})",
                        path=path,
                        digest=digest,
                    )
                if held:
                    yield held
        except (OSError, zstandard.ZstdError) as error:
            raise CorruptCache(f"{path} is damaged: {error}", path=path, digest=digest) from None

    def remove_leftovers(self) -> None:
        """Delete what an interrupted save left behind, and check ``blobs/`` holds only files.

        Hold the lock. Anything else in ``blobs/`` (a folder, say) is a CacheUnavailable
        before a save writes anything.
        """
        blob_dir = self.root / BLOBS
        with faults(self.root):
            for path in self.root.glob(f"{TEMP_PREFIX}*"):
                path.unlink()
            if blob_dir.exists() and not blob_dir.is_dir():
                raise unavailable(OSError(errno.ENOTDIR, "not a folder"), blob_dir)
            for path in blob_dir.iterdir() if blob_dir.is_dir() else ():
                if path.is_dir() and not path.is_symlink():
                    raise unavailable(OSError(errno.EISDIR, "is a folder"), path)
                if path.name.startswith(TEMP_PREFIX):
                    path.unlink()

    def remove_unreferenced(self, manifest: Manifest) -> int:
        """Delete blob files the manifest does not name; returns the bytes freed."""
        keep = {self.root / blob.file for blob in manifest.blobs.values()}
        freed = 0
        blob_dir = self.root / BLOBS
        with faults(blob_dir):
            for path in blob_dir.iterdir() if blob_dir.is_dir() else ():
                if path not in keep:
                    freed += path.lstat().st_size
                    path.unlink()
        return freed


class _CheckedReader:
    """A raw file's reads, counted and CRC-32'd on the way (for the zstd reader)."""

    def __init__(self, raw: IO[bytes], advance: Callable[[int], None]) -> None:
        self.raw = raw
        self.advance = advance
        self.size = 0
        self.check = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.size += len(data)
        self.check = zlib.crc32(data, self.check)
        self.advance(len(data))
        return data


def crc32(path: Path) -> tuple[int, int]:
    """A file's size and CRC-32, read in large chunks (about 7 GB/s from the page cache)."""
    check = 0
    size = 0
    with path.open("rb", buffering=0) as raw:
        while chunk := raw.read(CHUNK * 4):
            check = zlib.crc32(chunk, check)
            size += len(chunk)
    return size, check


def _open_nofollow(path: Path, flags: int) -> IO[bytes]:
    """``path`` opened with ``flags``, failing (ELOOP) when it is a symlink."""
    descriptor = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(descriptor, "ab" if flags & os.O_WRONLY else "rb")
