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

import gzip
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Protocol

import zstandard

from layerkeep.cache.store import Readable, config_layers
from layerkeep.cache.tarstream import Entry, resolve_link, write_tar
from layerkeep.core.errors import DockerOperationError

# Configs, manifests and index files are far smaller; a larger member is a layer or foreign.
SMALL = 4 << 20
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_TAR_MAGIC = slice(257, 262)
_HEAD = 512


class LayerStore(Protocol):
    """Where the layers of an archive go."""

    def known(self, name: str) -> str | None:
        """The diff id of the archive member ``name`` if it is stored and sound already."""

    def store(self, name: str, content: Readable) -> str:
        """Store an uncompressed layer read from ``content``; return its sha256 digest."""


@dataclass(frozen=True)
class SavedImage:
    """One image of an archive: its tags, exact config text and diff ids."""

    repo_tags: tuple[str, ...]
    config: str
    layers: tuple[str, ...]


def read_saved(stream: IO[bytes], layers: LayerStore, *, image: str) -> list[SavedImage]:
    """Read a `docker save` archive of ``image``, storing its layers as they pass."""
    digests: dict[str, str] = {}
    links: dict[str, str] = {}
    small: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                if member.issym():
                    links[member.name] = resolve_link(member)
                elif member.islnk():
                    links[member.name] = member.linkname
                elif member.isfile():
                    content = archive.extractfile(member)
                    if content is None:
                        continue
                    head = content.peek(_HEAD) if isinstance(content, io.BufferedReader) else b""
                    kind = _kind(member.name, head[:_HEAD])
                    if kind:
                        known = layers.known(member.name)
                        digests[member.name] = known or layers.store(
                            member.name, _decompressed(content, kind)
                        )
                    elif member.size <= SMALL:
                        small[member.name] = content.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error, zstandard.ZstdError) as error:
        raise DockerOperationError(
            f"docker save {image} gave an unreadable archive: {error}", image=image
        ) from None
    return _images(small, links, digests, layers, image)


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


def _decompressed(content: IO[bytes], kind: str) -> Readable:
    if kind == "gzip":
        return gzip.GzipFile(fileobj=content, mode="rb")
    if kind == "zstd":
        reader = zstandard.ZstdDecompressor().stream_reader(
            content, read_across_frames=True, closefd=False
        )
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return content


def _images(
    small: dict[str, bytes],
    links: dict[str, str],
    digests: dict[str, str],
    layers: LayerStore,
    image: str,
) -> list[SavedImage]:
    """Match the archive's manifest.json against what streamed past."""

    def refuse(problem: str) -> DockerOperationError:
        return DockerOperationError(f"docker save {image}: {problem}", image=image)

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
            for index, path in enumerate(paths):
                if path not in digests and path in small:
                    # A layer whose start did not look like one (never seen, but cheap).
                    digests[path] = layers.store(path, io.BytesIO(small[path]))
                if digests.get(path) != expected[index]:
                    raise refuse(f"layer {index} does not match its config")
            found.append(SavedImage(tuple(entry.get("RepoTags") or ()), config, tuple(expected)))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise refuse(f"unexpected manifest.json ({error})") from None
    return found


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
