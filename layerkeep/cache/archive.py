"""Read `docker save` archives in either layout; write the one every `docker load` takes.

- Legacy layout (Docker up to 24): ``manifest.json``, ``<config hex>.json`` and
  ``<v1 id>/layer.tar`` per layer (a layer two images share may be a symlink).
- OCI image layout (Docker 25+, and the only one of the containerd image store):
  ``oci-layout``, ``index.json`` and ``blobs/sha256/<digest>``, where a layer is an
  uncompressed tar or a gzip or zstd stream of one, plus a ``manifest.json`` in the
  legacy format whose paths name those blobs.

Archive members come in the engine's order (OCI blobs before the manifest that says what
they are), so every member is classified by its first bytes as it streams past: layers
go to the caller's store (decompressed), small files are kept in memory, and only at the
end does ``manifest.json`` say which layer is which. The cache keys every layer by its
uncompressed digest, the diff id the config lists, so one cache serves both layouts.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import zstandard

from layerkeep.cache.layout import CHUNK
from layerkeep.cache.manifest import config_layers
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.tarstream import (
    BLOCK,
    ChunkStream,
    Entry,
    Member,
    chunks_of,
    read_members,
    reader_over,
    resolve_link,
    write_tar,
)

# Configs, manifests and index files are far smaller; a larger member is a layer or foreign.
SMALL = 4 << 20
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_TAR_MAGIC = slice(257, 262)
_HEAD = BLOCK


class LayerStore(Protocol):
    """Where the layers of an archive go."""

    def cached(self, name: str, size: int) -> Collection[str]:
        """The cached diff ids the member ``name`` of ``size`` bytes may be, so that it can
        stream past unread (the archive's manifest settles which); empty: read it."""

    def has(self, digest: str) -> bool:
        """Whether the layer ``digest`` is stored and sound already."""

    def store(self, name: str, pieces: Iterable[bytes]) -> Callable[[], str]:
        """Store an uncompressed layer; the returned call waits for its sha256 digest."""


class SkippedWrongly(DockerOperationError):
    """A member left unread turned out to be a layer the cache lacks: read it again."""


@dataclass(frozen=True)
class SavedImage:
    """One image of an archive: its tags, exact config text, diff ids and member paths."""

    repo_tags: tuple[str, ...]
    config: str
    layers: tuple[str, ...]
    paths: tuple[str, ...] = ()


def read_saved(
    chunks: Iterable[bytes],
    layers: LayerStore,
    *,
    image: str,
    advance: Callable[[int], None] = lambda _: None,
) -> list[SavedImage]:
    """Read a `docker save` archive of ``image``, storing its new layers as they pass.

    ``advance`` is told how many bytes were read from the engine, as they are.
    """
    reading = _Reading(layers)
    stream = ChunkStream(_counted(chunks, advance))
    try:
        for member in read_members(stream):
            if member.kind == "symlink":
                reading.links[member.name] = resolve_link(member.name, member.linkname)
            elif member.kind == "hardlink":
                reading.links[member.name] = member.linkname
            elif member.kind == "file":
                reading.take(stream, member)
        stream.drain()
        found = {path: pending() for path, pending in reading.pending.items()}
    except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError) as error:
        raise DockerOperationError(
            f"docker save {image} gave an unreadable archive: {error}", image=image
        ) from None
    return reading.images(found, image)


def _counted(chunks: Iterable[bytes], advance: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        advance(len(chunk))
        yield chunk


@dataclass
class _Reading:
    """What streamed past so far: layers stored or skipped, links, small files."""

    layers: LayerStore
    pending: dict[str, Callable[[], str]] = field(default_factory=dict)
    skipped: dict[str, Collection[str]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    small: dict[str, bytes] = field(default_factory=dict)

    def take(self, stream: ChunkStream, member: Member) -> None:
        """Store, skip or keep one regular file of the archive."""
        kind = _kind(member.name, stream.peek(min(member.size, _HEAD)))
        if member.size <= SMALL:
            data = _whole(stream, member)
            if kind == "tar":
                # A small layer is hashed first: a known one is neither compressed nor written.
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                if self.layers.has(digest):
                    self.pending[member.name] = lambda: digest
                else:
                    self.pending[member.name] = self.layers.store(member.name, [data])
            elif kind:
                self.pending[member.name] = self.layers.store(
                    member.name, _decompressed([data], kind)
                )
            else:
                self.small[member.name] = data
            return
        if not kind:
            return  # neither a layer nor anything a manifest names: left unread
        candidates = self.layers.cached(member.name, member.size) if kind == "tar" else ()
        if candidates:
            self.skipped[member.name] = candidates
            return
        pieces = _exact(stream.pieces(member.size), member)
        self.pending[member.name] = self.layers.store(member.name, _decompressed(pieces, kind))

    def images(self, digests: dict[str, str], image: str) -> list[SavedImage]:
        """Match the archive's manifest.json against what streamed past."""

        def refuse(problem: str) -> DockerOperationError:
            return DockerOperationError(f"docker save {image}: {problem}", image=image)

        small, links = self.small, self.links
        if "manifest.json" not in small:
            raise refuse("the archive has no manifest.json (neither layout docker save writes)")
        try:
            listing = json.loads(small["manifest.json"])
            found: list[SavedImage] = []
            for entry in listing:
                config_name = links.get(entry["Config"], entry["Config"])
                if config_name not in small:
                    raise refuse(f"the archive lacks the config {config_name}")
                config = small[config_name].decode()
                expected = config_layers(json.loads(config))
                paths = [links.get(path, path) for path in entry["Layers"]]
                if len(paths) != len(expected):
                    raise refuse(f"{len(paths)} layers listed but the config has {len(expected)}")
                for index, (path, digest) in enumerate(zip(paths, expected, strict=True)):
                    if path not in digests and path in small:
                        # A layer whose start did not look like one (never seen, but cheap).
                        digests[path] = self.layers.store(path, [small[path]])()
                    if path in self.skipped:
                        if digest not in self.skipped[path]:
                            raise SkippedWrongly(
                                f"docker save {image}: {path} was left unread but the cache "
                                "lacks it",
                                image=image,
                            )
                        digests[path] = digest
                    if digests.get(path) != digest:
                        raise refuse(f"layer {index} does not match its config")
                tags = tuple(entry.get("RepoTags") or ())
                found.append(SavedImage(tags, config, tuple(expected), tuple(paths)))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise refuse(f"unexpected manifest.json ({error})") from None
        return found


def _whole(stream: ChunkStream, member: Member) -> bytes:
    data = stream.read(member.size)
    if len(data) != member.size:
        raise tarfile.ReadError(f"unexpected end of archive in {member.name}")
    return data


def _exact(pieces: Iterable[bytes], member: Member) -> Iterator[bytes]:
    """The pieces, raising (before the layer is committed) if the stream ends short."""
    total = 0
    for piece in pieces:
        total += len(piece)
        yield piece
    if total != member.size:
        raise tarfile.ReadError(f"unexpected end of archive in {member.name}")


def _kind(name: str, head: bytes) -> str:
    """'gzip', 'zstd' or 'tar' for a layer, '' for anything else (JSON, VERSION files)."""
    if head.startswith(_GZIP):
        return "gzip"
    if head.startswith(_ZSTD):
        return "zstd"
    empty_tar = len(head) == _HEAD and not head.strip(b"\0")
    if name.endswith("/layer.tar") or head[_TAR_MAGIC] == b"ustar" or empty_tar:
        return "tar"
    return ""


def _decompressed(pieces: Iterable[bytes], kind: str) -> Iterator[bytes]:
    """A compressed layer's pieces, decompressed a MB at a time (a tar's as they are)."""
    if kind == "tar":
        yield from pieces
        return
    if kind == "gzip":
        gunzip = zlib.decompressobj(wbits=31)
        for piece in pieces:
            data = piece
            while data:
                yield gunzip.decompress(data, CHUNK)
                data = gunzip.unconsumed_tail
                if gunzip.eof and gunzip.unused_data:
                    # Concatenated gzip members: each starts a new decompressor.
                    data = gunzip.unused_data
                    gunzip = zlib.decompressobj(wbits=31)
        yield gunzip.flush()
        if not gunzip.eof:
            raise zlib.error("the gzip stream ends early")
        return
    reader = zstandard.ZstdDecompressor().stream_reader(
        reader_over(pieces), read_across_frames=True
    )
    yield from chunks_of(reader, CHUNK)


@dataclass(frozen=True)
class LayerSource:
    """One layer to put in a load archive: its diff id and content (None: the engine has it)."""

    digest: str
    size: int
    chunks: Iterable[bytes] | None


def legacy_archive(
    config: str, layers: Sequence[LayerSource], repo_tags: Sequence[str]
) -> Iterator[bytes]:
    """A `docker load` archive in the legacy layout, which every engine version accepts.

    A layer without content is written empty: the classic image store never opens a
    layer whose chain it already has (the containerd image store does, so give it all).
    """
    config_hex = image_id_of(config).removeprefix("sha256:")
    entries = [
        Entry(
            f"{layer.digest.removeprefix('sha256:')}/layer.tar",
            layer.size if layer.chunks is not None else 0,
            layer.chunks if layer.chunks is not None else (),
        )
        for layer in layers
    ]
    config_name = f"{config_hex}.json"
    listing = [
        {"Config": config_name, "RepoTags": list(repo_tags), "Layers": [e.name for e in entries]}
    ]
    load_manifest = json.dumps(listing).encode()
    config_bytes = config.encode()
    entries[:0] = [
        Entry("manifest.json", len(load_manifest), [load_manifest]),
        Entry(config_name, len(config_bytes), [config_bytes]),
    ]
    return write_tar(entries)


def image_id_of(config: str) -> str:
    """An image's id on the classic image store: the digest of its config."""
    return "sha256:" + hashlib.sha256(config.encode()).hexdigest()
