"""What goes wrong with the cache folder: each error names the file or folder and the fix.

Every filesystem fault (full disk, read-only folder, a file where a folder belongs) is a
CacheUnavailable naming the path and the fix; a damaged or foreign file is CorruptCache.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from pathlib import Path

from layerkeep.cache.layout import BLOBS
from layerkeep.core.errors import LayerkeepError

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
def faults(path: Path) -> Iterator[None]:
    """Turn filesystem errors into CacheUnavailable naming ``path`` (or the error's file)."""
    try:
        yield
    except OSError as error:
        if error.errno is None:
            raise  # not the filesystem: a bad gzip stream (BadGzipFile) read from the engine
        where = Path(error.filename) if isinstance(error.filename, str) else path
        raise unavailable(error, where) from None
