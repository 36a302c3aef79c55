"""The cache folder: layers stored once each (zstd, by content digest) and a manifest.

Layout::

    manifest.json          images (tag -> id, config, layer digests) and blobs
    blobs/<hex>.zst        one compressed layer tar per diff id, shared by every image
    .lock                  taken while a save or load runs

Every file is written to a temporary name, fsynced and renamed, and the manifest is
replaced last: an interrupted or failed save leaves the previous cache whole.

A blob is checked three ways, from cheap to thorough: its size on disk (a stat, for
images a save leaves alone), a CRC-32 of the stored file recorded when it was written
(before a save reuses it or a load sends it: about 7 GB/s of compressed bytes), and the
zstd frame checksum and length of its content (while a load decompresses it, for free).
A blob that fails is dropped from the manifest, so the next save writes it again.

Every filesystem fault (full disk, read-only folder, a file where a folder belongs) is a
CacheUnavailable naming the path and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import queue
import re
import threading
import zlib
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import zstandard

from layerkeep.core.atomic import TEMP_PREFIX, atomic_write, fsync_folder
from layerkeep.core.errors import LayerkeepError

FORMAT = "layerkeep-cache/2"
MANIFEST = "manifest.json"
BLOBS = "blobs"
LOCK = ".lock"
CHUNK = 1 << 20
# Pieces (up to 96 KB each) waiting for the compressing thread: the save's read-ahead.
QUEUE_DEPTH = 64
# zstd's multi-threaded jobs: smaller than its default (4x the window, 8 MB at level 3)
# so that each thread holds a few MB (peak RSS stays under 100 MB with four threads).
JOB_SIZE = 2 << 20
MAX_AUTO_THREADS = 4
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_DIR_HINT = "set LAYERKEEP_CACHE_DIR to a folder of its own, or remove what is in the way"


class CacheError(LayerkeepError):
    """Something about the cache folder; names the file or folder concerned."""

    def __init__(self, message: str, *, path: Path, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.path = path


class CorruptCache(CacheError):
    """A cache file is missing, truncated, damaged or not ours.

    ``digest`` names the layer when one blob is at fault.
    """

    def __init__(self, message: str, *, path: Path, digest: str = "") -> None:
        super().__init__(message, path=path, hint="the next cache.save writes it again")
        self.digest = digest


class CacheUnavailable(CacheError):
    """The cache folder cannot be used: full, read-only, or not a folder."""


def unavailable(error: OSError, path: Path) -> CacheUnavailable:
    """The one-line error for a filesystem fault at ``path``; nothing cached was changed."""
    code = error.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return CacheUnavailable(
            f"no space left on the device holding {path}; the cache was left as it was",
            path=path,
            hint="free space there, or set LAYERKEEP_CACHE_DIR to a bigger disk",
        )
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return CacheUnavailable(
            f"cannot write to {path}: {error.strerror or 'permission denied'}",
            path=path,
            hint="make the folder writable, or set LAYERKEEP_CACHE_DIR to a writable folder",
        )
    if code in (errno.ENOTDIR, errno.EEXIST):
        return CacheUnavailable(f"{path} is not a folder", path=path, hint=_DIR_HINT)
    if code == errno.ELOOP:
        return CacheUnavailable(
            f"{path} is a symlink; layerkeep follows no link inside the cache folder",
            path=path,
            hint="remove it: the cache folder holds only the files layerkeep writes",
        )
    if code == errno.EISDIR:
        return CacheUnavailable(
            f"{path} is a folder where the cache keeps a file",
            path=path,
            hint=f"remove it: {BLOBS}/ holds only the files layerkeep writes",
        )
    return CacheUnavailable(
        f"cannot use the cache at {path}: {error.strerror or error}", path=path, hint=_DIR_HINT
    )


@contextlib.contextmanager
def _faults(path: Path) -> Iterator[None]:
    """Turn filesystem errors into CacheUnavailable naming ``path`` (or the error's file)."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise  # not the filesystem: a bad gzip stream (BadGzipFile) read from the engine
        where = Path(error.filename) if isinstance(error.filename, str) else path
        raise unavailable(error, where) from None


@dataclass(frozen=True)
class Blob:
    """One stored layer: its file, uncompressed size, size on disk and CRC-32 on disk."""

    file: str
    size: int
    stored: int
    check: int


@dataclass(frozen=True)
class CachedImage:
    """An image as the cache keeps it: enough to rebuild a `docker load` archive.

    ``id`` is the config digest (the same on every engine); ``engine_id`` is what the
    saving engine called it (the manifest or index digest on the containerd image store).
    """

    id: str
    config: str
    layers: tuple[str, ...]
    engine_id: str = ""

    @property
    def created(self) -> str:
        """The config's creation time, which with the layers tells the image apart."""
        return str(json.loads(self.config).get("created", ""))


@dataclass
class Manifest:
    """What the cache holds; ``blobs`` lists only blobs that passed their last check."""

    images: dict[str, CachedImage] = field(default_factory=dict)
    blobs: dict[str, Blob] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    # BuildKit's own cache in buildkit/ (see cache.buildkit_dir): the descriptor of its
    # cache manifest, or None when the folder holds none.
    buildkit: dict[str, Any] | None = None

    def prune(self) -> None:
        """Forget layers no image needs."""
        needed = {digest for image in self.images.values() for digest in image.layers}
        self.forget(set(self.blobs) - needed)

    def forget(self, digests: Iterable[str]) -> None:
        """Drop blobs (and the archive names that led to them)."""
        for digest in digests:
            self.blobs.pop(digest, None)
        self.names = {n: d for n, d in self.names.items() if d in self.blobs}

    def to_json(self) -> str:
        """The manifest file's text."""
        return json.dumps(
            {
                "format": FORMAT,
                "images": {
                    tag: {
                        "id": i.id,
                        "engine_id": i.engine_id,
                        "config": i.config,
                        "layers": list(i.layers),
                    }
                    for tag, i in sorted(self.images.items())
                },
                "blobs": {
                    digest: {"file": b.file, "size": b.size, "stored": b.stored, "crc32": b.check}
                    for digest, b in sorted(self.blobs.items())
                },
                "names": dict(sorted(self.names.items())),
                **({"buildkit": self.buildkit} if self.buildkit else {}),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, path: Path) -> Manifest:
        """Parse a manifest; anything unexpected is a CorruptCache naming the file."""
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise CorruptCache(
                    f"{path} is not a {FORMAT} manifest (an older layerkeep or another tool "
                    "wrote it)",
                    path=path,
                )
            images = {
                str(tag): CachedImage(
                    str(i["id"]),
                    str(i["config"]),
                    tuple(_digest(str(layer)) for layer in i["layers"]),
                    str(i.get("engine_id", "")),
                )
                for tag, i in data["images"].items()
            }
            blobs = {
                _digest(str(d)): Blob(
                    _blob_file(str(d), str(b["file"])), int(b["size"]), int(b["stored"]),
                    int(b["crc32"]),
                )
                for d, b in data["blobs"].items()
            }
            names = {str(k): str(v) for k, v in data.get("names", {}).items()}
            buildkit = data.get("buildkit")
            if buildkit is not None and not isinstance(buildkit, dict):
                raise TypeError("buildkit is not a descriptor")
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptCache(f"{path} is damaged ({error})", path=path) from None
        return cls(images, blobs, names, buildkit)


def _digest(text: str) -> str:
    """``text`` if it is a sha256 digest; ValueError otherwise."""
    if _DIGEST.fullmatch(text) is None:
        raise ValueError(f"{text[:80]!r} is not a sha256 digest")
    return text


def _blob_file(digest: str, file: str) -> str:
    """The blob's file if it is the one layerkeep writes for ``digest``; ValueError
    otherwise: the manifest is joined to the folder, so any other name (``../x``, an
    absolute path) would read or remove a file outside it."""
    if file != f"{BLOBS}/{digest.removeprefix('sha256:')}.zst":
        raise ValueError(f"blob {digest[:19]} is kept as {file[:80]!r}, not {BLOBS}/<digest>.zst")
    return file


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
        with _faults(self.root):
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
            with _faults(self.root):
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
            return _crc32(self.blob_path(blob)) == (blob.stored, blob.check)
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
        with _faults(self.root):
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
        with _faults(blob_dir):
            for path in blob_dir.iterdir() if blob_dir.is_dir() else ():
                if path not in keep:
                    freed += path.lstat().st_size
                    path.unlink()
        return freed


@contextlib.contextmanager
def _temporary(folder: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A temporary file in ``folder``, removed unless the caller renamed it."""
    path = folder / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with path.open("xb") as stream:
            yield path, stream
    finally:
        path.unlink(missing_ok=True)


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


def _crc32(path: Path) -> tuple[int, int]:
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


def config_layers(config: Mapping[str, Any]) -> list[str]:
    """The diff ids an image config lists, in order."""
    return [str(d) for d in config.get("rootfs", {}).get("diff_ids", [])]


def compression_threads(wanted: int) -> int:
    """zstd worker threads: ``wanted``, or for 0 one per core (at most four)."""
    if wanted > 0:
        return wanted
    return max(1, min(os.cpu_count() or 1, MAX_AUTO_THREADS))


def compressor(level: int, threads: int) -> zstandard.ZstdCompressor:
    """The cache's zstd compressor: frame checksums, ``threads`` workers, bounded jobs."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, threads=threads, job_size=JOB_SIZE if threads > 1 else 0, write_checksum=True
    )
    return zstandard.ZstdCompressor(compression_params=params)


Stored = Callable[[], tuple[str, Blob]]


class BlobWriter:
    """Compresses layers into ``blobs/`` on a thread of its own while the caller reads on.

    :meth:`write` hands a layer's pieces over through a bounded queue (so memory stays
    bounded whatever the layer's size) and returns at once a function that waits for the
    layer's (digest, blob). The caller's thread hashes each piece as it hands it over
    (hashlib lets go of the GIL, so this overlaps the compressing); the writer's thread
    feeds zstd's own workers, fsyncs, records the CRC-32 of the file and renames it to
    its digest.
    A layer whose digest is in ``sound`` is not renamed over the file already there.
    Use it as a context manager: leaving it stops the thread and removes temporary files.
    """

    def __init__(
        self, cache: CacheDir, *, level: int, threads: int, sound: Container[str] = ()
    ) -> None:
        self.cache = cache
        self.sound = sound
        self._compressor = compressor(level, threads)
        self._queue: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="layerkeep-blobs", daemon=True)
        self._thread.start()

    def write(self, pieces: Iterable[bytes]) -> Stored:
        """Queue one layer's uncompressed pieces; the returned call waits for its blob."""
        done: Future[tuple[str, Blob]] = Future()
        digest = hashlib.sha256()
        self._put(done)
        for piece in pieces:
            digest.update(piece)
            self._put(piece)
        self._put(digest)

        def result() -> tuple[str, Blob]:
            return done.result()

        return result

    def _put(self, item: object) -> None:
        if self._failed is not None:
            # The thread stopped on a filesystem fault: stop reading the engine too.
            raise self._failed
        self._queue.put(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            assert isinstance(item, Future)
            try:
                item.set_result(self._store())
            except BaseException as error:  # handed to the reading thread, which raises it
                self._failed = error
                item.set_exception(error)
                self._drain()

    def _drain(self) -> None:
        """Drop queued pieces after a fault until the reader stops or the layer ends."""
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.put(None)
                return
            if isinstance(item, Future):
                item.set_exception(self._failed or RuntimeError("stopped"))

    def _store(self) -> tuple[str, Blob]:
        blobs = self.cache.root / BLOBS
        with _faults(blobs):
            blobs.mkdir(parents=True, exist_ok=True)
            size = 0
            with _temporary(blobs) as (temp_path, raw):
                with self._compressor.stream_writer(raw, closefd=False) as writer:
                    # Pieces, then the layer's hash (its end), or None: the reader stopped.
                    while isinstance(piece := self._queue.get(), bytes):
                        size += len(piece)
                        writer.write(piece)
                if piece is None:
                    self._queue.put(None)
                    raise _Stopped
                digest = cast("hashlib._Hash", piece)
                raw.flush()
                os.fsync(raw.fileno())
                name = f"sha256:{digest.hexdigest()}"
                final = blobs / f"{digest.hexdigest()}.zst"
                if not (name in self.sound and final.is_file()):
                    temp_path.replace(final)
                stored, check = _crc32(final)
        return name, Blob(f"{BLOBS}/{final.name}", size, stored, check)

    def close(self) -> None:
        """Stop the thread once it has finished what was queued."""
        self._queue.put(None)
        self._thread.join()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Stopped(Exception):
    """The reader stopped in the middle of a layer (its own error is what the user sees)."""
