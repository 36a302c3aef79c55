"""One running job per build id on an engine: a lock file that dies with its process.

Two jobs with the same build id would share container and network names and remove
each other's services. A job holds an exclusive ``flock`` on a file named after the
engine, the project and the build id for as long as it runs. Separate invocations
inside one job (``inv services.up``, later ``inv test.run``) run one after another, so
they take the same lock in turn and find each other's services.

The lock files live in a folder of the user's own (:data:`LOCK_FOLDER`, mode 0700),
checked before every use: a symlink, or a folder another user owns or may write, is
refused, since a root job writing through another user's symlink would write wherever
it points. Files are opened relative to that folder, never following a link, and a job
removes its file when it ends. Whoever takes a lock checks afterwards that the path
still names the file it locked: one that was removed meanwhile is opened again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from layerkeep.core.errors import LayerkeepError

# Per user: the lock files of another user's jobs are no business of ours.
LOCK_FOLDER = Path(tempfile.gettempdir()) / f"layerkeep-locks-{os.geteuid()}"
# A run whose build id nobody configured takes the first free id of this many.
_LOCAL_SLOTS = 50
_HOLDER_BYTES = 512
# Opening a lock file again because its holder removed it meanwhile: once is the rule.
_ATTEMPTS = 20


class BuildIdInUse(LayerkeepError):
    """Another running job holds this build id on this engine."""

    exit_code = 4

    def __init__(self, build_id: str, holder: str) -> None:
        super().__init__(
            f"build id {build_id!r} is in use on this engine by {holder}",
            hint="wait for it to finish, or give this job its own LAYERKEEP_BUILD_ID",
        )
        self.build_id = build_id
        self.holder = holder


class UnsafeLockFolder(LayerkeepError):
    """The lock folder is not a private folder of this user's."""

    exit_code = 2

    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(
            f"lock folder {folder} {problem}; layerkeep keeps no lock there",
            hint="another user may have made it: remove it if nothing of yours is in it, "
            "or set TMPDIR to a folder of your own",
        )
        self.path = folder


@dataclass
class JobLock:
    """A held lock; ``build_id`` is the id the job runs under."""

    build_id: str
    path: Path
    handle: IO[bytes]
    folder: int  # the lock folder, open: the file is removed relative to it

    def release(self) -> None:
        """Remove the lock file and let the next job with this build id run."""
        if self.handle.closed:
            return
        try:
            if _still_named(self.folder, self.path.name, self.handle):
                os.unlink(self.path.name, dir_fd=self.folder)
        finally:
            # Unlocked only once removed: a job that opened the old file then sees that
            # the name went and opens it again.
            self.handle.close()
            os.close(self.folder)


def hold_build_id(
    engine: str,
    project: str,
    build_id: str,
    *,
    configured: bool,
    command: str,
    folder: Path = LOCK_FOLDER,
) -> JobLock:
    """Lock ``build_id`` for this process, or stop with one line naming the holder.

    When nobody configured the build id (the local default), a busy id is not an
    error: the job takes the next free one (``local-2``, ``local-3``, ...) instead.
    ``folder`` is made (0700) when missing; UnsafeLockFolder when it is not private.
    """
    candidates = [build_id]
    if not configured:
        candidates += [f"{build_id}-{n}" for n in range(2, _LOCAL_SLOTS + 1)]
    descriptor = open_private_folder(folder)
    holder = ""
    lock: JobLock | None = None
    try:
        for candidate in candidates:
            name = f"{_key(engine, project, candidate)}.lock"
            held = _try_lock(folder, descriptor, name, command)
            if not isinstance(held, str):
                lock = JobLock(candidate, folder / name, held, descriptor)
                return lock
            holder = holder or held
    finally:
        if lock is None:
            os.close(descriptor)
    raise BuildIdInUse(build_id, holder or "another job")


def open_private_folder(folder: Path) -> int:
    """``folder``, made 0700 when missing, open; UnsafeLockFolder unless it is private.

    Private: a real folder (not a symlink), owned by this user, that nobody else may
    write. Checked on the open descriptor, so it cannot change between check and use.
    """
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass  # checked below, whoever made it
    except OSError as error:
        raise UnsafeLockFolder(folder, f"cannot be made: {error.strerror}") from None
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        problem = "is a symlink" if folder.is_symlink() else f"cannot be opened: {error.strerror}"
        raise UnsafeLockFolder(folder, problem) from None
    info = os.fstat(descriptor)
    problem = ""
    if info.st_uid != os.geteuid():
        problem = f"belongs to uid {info.st_uid}, not to you (uid {os.geteuid()})"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"may be written by others (mode {stat.S_IMODE(info.st_mode):o})"
    if problem:
        os.close(descriptor)
        raise UnsafeLockFolder(folder, problem)
    return descriptor


def _key(engine: str, project: str, build_id: str) -> str:
    digest = hashlib.sha256(f"{engine}\0{project}\0{build_id}".encode()).hexdigest()[:16]
    return f"{project[:40]}-{build_id[:40]}-{digest}"


def _try_lock(folder: Path, descriptor: int, name: str, command: str) -> IO[bytes] | str:
    """The open, locked file ``name`` of ``folder`` (open as ``descriptor``); or, when
    another process holds it, who that is."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_ATTEMPTS):
        try:
            handle = os.fdopen(os.open(name, flags, 0o600, dir_fd=descriptor), "r+b")
        except OSError as error:  # ELOOP: a symlink where the lock file belongs
            raise UnsafeLockFolder(
                folder, f"holds {name}, which cannot be a lock file ({error.strerror})"
            ) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read(_HOLDER_BYTES).decode(errors="replace").strip()
            handle.close()
            return holder or "another job"
        if _still_named(descriptor, name, handle):
            handle.truncate(0)  # what a killed holder wrote; the file is ours and locked
            started = time.strftime("%H:%M:%S")
            handle.write(f"pid {os.getpid()} ({command}, since {started})".encode())
            handle.flush()
            return handle
        handle.close()  # its holder removed it as we opened it: take the new one
    raise UnsafeLockFolder(folder, f"holds {name}, which is replaced as fast as it is locked")


def _still_named(folder: int, name: str, handle: IO[bytes]) -> bool:
    """Whether ``name`` in ``folder`` is still the file ``handle`` has open."""
    try:
        named = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)
