"""The cache's manifest: the images it holds and the blob that stores each layer.

A blob is listed only while it passed its last check; a name read from the file is one
layerkeep writes (a sha256 digest, ``blobs/<hex>.zst``), else the manifest is damaged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerkeep.cache.layout import BLOBS, FORMAT
from layerkeep.cache.store_errors import CorruptCache

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


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


def config_layers(config: Mapping[str, Any]) -> list[str]:
    """The diff ids an image config lists, in order."""
    return [str(d) for d in config.get("rootfs", {}).get("diff_ids", [])]
