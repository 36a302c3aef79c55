"""Stream tar archives in both directions without holding them in memory."""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

BLOCK = 512


class IterReader:
    """A read-only file over an iterator of byte chunks (what docker-py streams)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes; all that is left when ``size`` is negative."""
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


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
