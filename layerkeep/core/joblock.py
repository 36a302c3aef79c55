"""One running job per build id on an engine: a lock file that dies with its process.

Two jobs with the same build id would share container and network names and remove
each other's services. A job holds an exclusive ``flock`` on a file named after the
engine, the project and the build id for as long as it runs. Separate invocations
inside one job (``inv services.up``, later ``inv test.run``) run one after another, so
they take the same lock in turn and find each other's services.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from layerkeep.core.errors import LayerkeepError

LOCK_FOLDER = Path(tempfile.gettempdir()) / "layerkeep-locks"
# A run whose build id nobody configured takes the first free id of this many.
_LOCAL_SLOTS = 50


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


@dataclass
class JobLock:
    """A held lock; ``build_id`` is the id the job runs under."""

    build_id: str
    path: Path
    handle: IO[str]

    def release(self) -> None:
        """Let the next job with this build id run."""
        if not self.handle.closed:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


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
    """
    folder.mkdir(parents=True, exist_ok=True)
    candidates = [build_id]
    if not configured:
        candidates += [f"{build_id}-{n}" for n in range(2, _LOCAL_SLOTS + 1)]
    holder = ""
    for candidate in candidates:
        path = folder / f"{_key(engine, project, candidate)}.lock"
        held = _try_lock(path, command)
        if isinstance(held, str):
            holder = holder or held
            continue
        return JobLock(build_id=candidate, path=path, handle=held)
    raise BuildIdInUse(build_id, holder or "another job")


def _key(engine: str, project: str, build_id: str) -> str:
    digest = hashlib.sha256(f"{engine}\0{project}\0{build_id}".encode()).hexdigest()[:16]
    return f"{project[:40]}-{build_id[:40]}-{digest}"


def _try_lock(path: Path, command: str) -> IO[str] | str:
    """The open, locked file; or, when another process holds it, who that is."""
    handle = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another job"
        handle.close()
        return holder
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%H:%M:%S")
    handle.write(f"pid {os.getpid()} ({command}, since {started})")
    handle.flush()
    return handle
