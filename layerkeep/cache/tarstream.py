"""Stream tar archives in both directions without holding them in memory."""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

BLOCK = 512


class _ChunkReader(io.RawIOBase):
    """Raw reads over an iterator of byte chunks, copying each byte once."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        target = memoryview(buffer).cast("B")
        size = min(len(target), len(self._pending))
        target[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def reader_over(chunks: Iterable[bytes]) -> io.BufferedReader:
    """A buffered binary file over byte chunks (what docker-py streams)."""
    return io.BufferedReader(_ChunkReader(chunks), buffer_size=1 << 20)


def resolve_link(member: tarfile.TarInfo) -> str:
    """The member a symlink inside the archive points at (docker save links shared layers)."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(member.name), member.linkname))


@dataclass(frozen=True)
class Entry:
    """One regular file of an archive to write: its name, size and content chunks."""

    name: str
    size: int
    chunks: Iterable[bytes]


def write_tar(entries: Iterable[Entry]) -> Iterator[bytes]:
    """Yield a tar archive of ``entries``, checking each delivers exactly its size."""
    for entry in entries:
        info = tarfile.TarInfo(entry.name)
        info.size = entry.size
        info.mode = 0o644
        yield info.tobuf(format=tarfile.GNU_FORMAT)
        written = 0
        for chunk in entry.chunks:
            written += len(chunk)
            if written > entry.size:
                break
            yield chunk
        if written != entry.size:
            raise ValueError(f"{entry.name}: expected {entry.size} bytes, got {written}")
        remainder = entry.size % BLOCK
        if remainder:
            yield b"\0" * (BLOCK - remainder)
    yield b"\0" * (2 * BLOCK)
