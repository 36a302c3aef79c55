"""LAYERKEEP_CACHE_MOUNTS, dir backend: ``mounts/`` in LAYERKEEP_CACHE_DIR, an
``index.json`` and one ``<sha256>.tar.zst`` per mount, each written to a temporary name,
fsynced and renamed under the cache folder's lock, the index last. The mounts saved least
recently (written, or found unchanged) go first when LAYERKEEP_CACHE_MOUNTS_MAX is passed.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import zstandard

from layerkeep.building.cache_mounts import CacheMount
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CorruptCache, unavailable
from layerkeep.core.atomic import atomic_write

FOLDER = "mounts"
INDEX = "index.json"
FORMAT = "layerkeep-cache-mounts/1"
_HEX = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20


@dataclass(frozen=True)
class KeptMount:
    """One mount in the cache folder: its file, its content's digest and size, when saved."""

    id: str
    file: str
    digest: str
    size: int
    saved: float


@dataclass(frozen=True)
class MountStore:
    """``mounts/`` in a cache folder (see the module's notes)."""

    cache_dir: Path

    @property
    def folder(self) -> Path:
        """Where the index and the archives live."""
        return self.cache_dir / FOLDER

    def read_index(self) -> dict[str, KeptMount]:
        """Mount key -> what is kept; empty when nothing was saved, CorruptCache if damaged."""
        path = self.folder / INDEX
        try:
            data = json.loads(path.read_text("utf-8"))
            if data.get("format") != FORMAT:
                raise CorruptCache(f"{path} is not a {FORMAT} index", path=path)
            index = {str(key): KeptMount(**entry) for key, entry in data["mounts"].items()}
            for kept in index.values():
                if kept.file != archive_name(kept.digest):
                    # Joined to the folder: any other name would read or remove elsewhere.
                    raise ValueError(f"{kept.file!r} is not the archive of {kept.digest!r}")
            return index
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CorruptCache(f"{path} is damaged ({error})", path=path) from None

    def keep(self, mount: CacheMount, tar: Path, digest: str, size: int, *, level: int) -> bool:
        """Store the mount's tar unless the same contents are kept; whether it was written."""
        with CacheDir(self.cache_dir).locked():
            index = self._index_or_empty()
            old = index.get(mount.key)
            written = old is None or old.digest != digest or not (self.folder / old.file).is_file()
            file = old.file if old is not None and not written else archive_name(digest)
            if written:
                self._compress(tar, self.folder / file, level)
            index[mount.key] = KeptMount(mount.id, file, digest, size, time.time())
            self._write_index(index)
        return written

    def unpack(self, mount: CacheMount, tar: Path) -> int | None:
        """Write the kept tar of ``mount`` to ``tar``; its size, or None when none is kept.

        A damaged archive is dropped from the index (the next save writes it again) and
        raised as CorruptCache.
        """
        with CacheDir(self.cache_dir).locked(write=False):
            kept = self._index_or_empty().get(mount.key)
            if kept is None:
                return None
            path = self.folder / kept.file
            digest = hashlib.sha256()
            size = 0
            try:
                with path.open("rb") as raw, tar.open("wb") as output:
                    reader = zstandard.ZstdDecompressor().stream_reader(raw)
                    while chunk := reader.read(CHUNK):
                        digest.update(chunk)
                        size += len(chunk)
                        output.write(chunk)
                sound = f"sha256:{digest.hexdigest()}" == kept.digest and size == kept.size
                problem = "its content does not match its digest"
            except (OSError, zstandard.ZstdError) as error:
                sound, problem = False, str(error)
        if not sound:
            self._forget(mount.key)
            raise CorruptCache(f"{path} is damaged: {problem}", path=path)
        return size

    def evict(self, limit: int) -> list[str]:
        """Drop the mounts saved least recently until the rest fit in ``limit``; their ids."""
        with CacheDir(self.cache_dir).locked():
            index = self._index_or_empty()
            total, dropped = 0, []
            for key, kept in sorted(index.items(), key=lambda item: -item[1].saved):
                total += kept.size
                if total > limit:
                    dropped.append(key)
            for key in dropped:
                (self.folder / index.pop(key).file).unlink(missing_ok=True)
            if dropped:
                self._write_index(index)
            self._remove_strays(index)
        return [key.split(",")[0] for key in dropped]

    def remove(self, keys: Collection[str]) -> None:
        """Forget the mounts ``keys`` and delete their archives; hold the cache's lock."""
        index = self._index_or_empty()
        gone = [index.pop(key) for key in keys if key in index]
        for kept in gone:
            if all(other.file != kept.file for other in index.values()):
                (self.folder / kept.file).unlink(missing_ok=True)
        self._write_index(index)

    def _index_or_empty(self) -> dict[str, KeptMount]:
        try:
            return self.read_index()
        except CorruptCache:
            return {}  # rewritten whole by this save; the archives it named are strays

    def _forget(self, key: str) -> None:
        with CacheDir(self.cache_dir).locked():
            index = self._index_or_empty()
            if index.pop(key, None) is not None:
                self._write_index(index)

    def _compress(self, tar: Path, target: Path, level: int) -> None:
        compressor = zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)

        def compressed() -> Iterator[bytes]:
            with tar.open("rb") as source:
                yield from compressor.read_to_iter(source, read_size=CHUNK, write_size=CHUNK)

        self._write(target, compressed())

    def _write_index(self, index: dict[str, KeptMount]) -> None:
        data = {
            "format": FORMAT,
            "mounts": {key: kept.__dict__ for key, kept in sorted(index.items())},
        }
        self._write(self.folder / INDEX, json.dumps(data, indent=1).encode())

    def _remove_strays(self, index: dict[str, KeptMount]) -> None:
        """Archives no entry names and temporary files an interrupted save left."""
        keep = {kept.file for kept in index.values()} | {INDEX}
        try:
            for path in self.folder.iterdir() if self.folder.is_dir() else ():
                if path.name not in keep and path.is_file():
                    path.unlink()
        except OSError as error:
            raise unavailable(error, self.folder) from None

    def _write(self, target: Path, data: bytes | Iterable[bytes]) -> None:
        try:
            atomic_write(target, data, mode=0o644)
        except OSError as error:
            raise unavailable(error, target) from None


def archive_name(digest: str) -> str:
    """The file a mount's archive is kept in: its content's digest; ValueError for a
    digest that is not sha256."""
    if not digest.startswith("sha256:") or not _HEX.fullmatch(digest[7:]):
        raise ValueError(f"{digest!r} is not a sha256 digest")
    return f"{digest[7:]}.tar.zst"
