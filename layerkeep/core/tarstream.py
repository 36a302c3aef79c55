"""Stream tar archives in both directions without holding them in memory."""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

BLOCK = 512
# Pieces handed on are joined up to this size: fewer calls downstream, and small enough
# for glibc's heap (its mmap threshold starts at 128 KB), which keeps the save's RSS flat.
BATCH = 96 << 10


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


def chunks_of(stream: IO[bytes], size: int) -> Iterator[bytes]:
    """``stream`` read to its end, ``size`` bytes at a time (``reader_over`` the other way)."""
    while chunk := stream.read(size):
        yield chunk


def resolve_link(name: str, linkname: str) -> str:
    """The member a symlink inside the archive points at (docker save links shared layers)."""
    return posixpath.normpath(posixpath.join(posixpath.dirname(name), linkname))


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


class ChunkStream:
    """Sequential reads over byte chunks (docker-py's 32 KB pieces), copying little.

    Member content is handed on as the chunks' own slices, joined up to ``BATCH`` bytes,
    and skipped content is dropped without a copy. ``consumed`` counts bytes taken.
    """

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")
        self.consumed = 0

    def _next(self) -> bool:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return False
            self._pending = memoryview(chunk)
        return True

    def read(self, size: int) -> bytes:
        """Exactly ``size`` bytes, or fewer at the end of the stream."""
        return b"".join(self.pieces(size))

    def peek(self, size: int) -> bytes:
        """Up to ``size`` bytes ahead (fewer only at the end), not consumed."""
        while len(self._pending) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._pending = memoryview(bytes(self._pending) + chunk)
        return bytes(self._pending[:size])

    def pieces(self, size: int) -> Iterator[bytes]:
        """The next ``size`` bytes as pieces of at most ``BATCH`` bytes; short at the end."""
        left = size
        batch: list[memoryview] = []
        batched = 0
        while left and self._next():
            piece = self._pending[:left]
            self._pending = self._pending[len(piece):]
            left -= len(piece)
            self.consumed += len(piece)
            batch.append(piece)
            batched += len(piece)
            if batched >= BATCH:
                yield b"".join(batch)
                batch, batched = [], 0
        if batch:
            yield b"".join(batch)

    def drain(self) -> None:
        """Read to the end (what follows a tar's end marker), so the response completes."""
        self.consumed += len(self._pending)
        self._pending = memoryview(b"")
        for chunk in self._chunks:
            self.consumed += len(chunk)

    def skip(self, size: int) -> int:
        """Drop the next ``size`` bytes; returns how many there were."""
        left = size
        while left and self._next():
            taken = min(left, len(self._pending))
            self._pending = self._pending[taken:]
            left -= taken
        self.consumed += size - left
        return size - left


MemberKind = Literal["file", "symlink", "hardlink", "other"]


@dataclass(frozen=True)
class Member:
    """One archive member as it streams past: name, size, kind and link target."""

    name: str
    size: int
    kind: MemberKind
    linkname: str = ""


def read_members(stream: ChunkStream) -> Iterator[Member]:
    """Each member of a tar stream; its content must be taken (or skipped) before the next.

    Handles the GNU long-name and pax headers Go's archive/tar writes for long names.
    A truncated stream raises tarfile.ReadError.
    """
    long_name = ""
    long_link = ""
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK or not header.strip(b"\0"):
            if header and len(header) < BLOCK:
                raise tarfile.ReadError("unexpected end of archive")
            return
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        padding = -info.size % BLOCK
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK):
            text = _exactly(stream, info.size).rstrip(b"\0").decode("utf-8", "surrogateescape")
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = text
            else:
                long_link = text
            stream.skip(padding)
            continue
        if info.type in (tarfile.XHDTYPE, tarfile.XGLTYPE):
            fields = _pax_fields(_exactly(stream, info.size))
            stream.skip(padding)
            if info.type == tarfile.XHDTYPE:
                long_name = fields.get("path", long_name)
                long_link = fields.get("linkpath", long_link)
            continue
        name = long_name or info.name
        linkname = long_link or info.linkname
        long_name = long_link = ""
        kind: MemberKind = "other"
        if info.isreg():
            kind = "file"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        # tarfile's rule: only regular files and unknown types carry content.
        has_data = info.isreg() or info.type not in tarfile.SUPPORTED_TYPES
        size = info.size if has_data else 0
        padding = -size % BLOCK
        start = stream.consumed
        yield Member(name, size, kind, linkname)
        # Whatever content the caller did not take is skipped, then the padding.
        left = size - (stream.consumed - start)
        if stream.skip(left + padding) < left:
            raise tarfile.ReadError(f"unexpected end of archive in {name}")


def _exactly(stream: ChunkStream, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise tarfile.ReadError("unexpected end of archive")
    return data


def _pax_fields(data: bytes) -> dict[str, str]:
    """The records of a pax header: ``<length> <key>=<value>\\n`` each."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(data):
        length_text, _, _ = data[position:position + 20].partition(b" ")
        if not length_text.isdigit():
            raise tarfile.ReadError("malformed pax header")
        length = int(length_text)
        if length <= len(length_text) + 1:
            raise tarfile.ReadError("malformed pax header")
        record = data[position + len(length_text) + 1:position + length - 1]
        key, _, value = record.partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return fields
