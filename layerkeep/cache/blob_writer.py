"""Layers compressed into the cache's ``blobs/`` on a thread of their own (see BlobWriter)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Container, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import IO, cast

import zstandard

from layerkeep.cache.layout import BLOBS
from layerkeep.cache.manifest import Blob
from layerkeep.cache.store import CacheDir, crc32
from layerkeep.cache.store_errors import faults
from layerkeep.core.atomic import TEMP_PREFIX

# Pieces (up to 96 KB each) waiting for the compressing thread: the save's read-ahead.
QUEUE_DEPTH = 64
# zstd's multi-threaded jobs: smaller than its default (4x the window, 8 MB at level 3)
# so that each thread holds a few MB (peak RSS stays under 100 MB with four threads).
JOB_SIZE = 2 << 20
MAX_AUTO_THREADS = 4


@contextlib.contextmanager
def _temporary(folder: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """A temporary file in ``folder``, removed unless the caller renamed it."""
    path = folder / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with path.open("xb") as stream:
            yield path, stream
    finally:
        path.unlink(missing_ok=True)


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
        with faults(blobs):
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
                stored, check = crc32(final)
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
