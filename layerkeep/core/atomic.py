"""Replace a file whole or not at all: write a temporary file beside it, fsync, rename.

:func:`atomic_write` is how layerkeep writes every file that must never be seen half
written (the cache's manifests and archives, the run report, the reports manifest).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

# What a temporary file begins with: a folder's owner removes those a crash left.
TEMP_PREFIX = ".tmp-"


def atomic_write(path: Path, data: bytes | Iterable[bytes], *, mode: int) -> None:
    """Make ``path`` hold ``data`` (bytes, or pieces written as they come): readers see
    the old file or the new one, never a part, and after a crash the new one only if
    this returned. ``mode`` is the file's permission bits (the umask does not apply).
    Creates the parent folder if needed; an error leaves no temporary file."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"{TEMP_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    descriptor = os.open(temporary, flags, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            os.fchmod(stream.fileno(), mode)
            for piece in [data] if isinstance(data, bytes) else data:
                stream.write(piece)
            stream.flush()
            os.fsync(stream.fileno())
        temporary.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
    fsync_folder(folder)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
