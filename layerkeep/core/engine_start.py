"""A fresh machine: Docker is installed but its engine is not running; start it if we may.

layerkeep starts ``dockerd`` only when that is what a user would do by hand on this
machine: as root, with ``dockerd`` installed, for the local socket (``DOCKER_HOST`` unset
or naming it). Anything else (a remote engine, another user's, Docker Desktop) is left
alone and reported in one line. The daemon gets its own session so that it outlives the
run (the next run reuses it), and logs to :data:`DOCKERD_LOG`.

It gets only what dockerd reads from its environment (:func:`dockerd_environment`): a
root daemon that outlives the job has no use for the job's registry password or tokens.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from layerkeep.core.engine import DEFAULT_TIMEOUT, Engine, connect, describe_host
from layerkeep.core.errors import EngineUnavailable
from layerkeep.core.job import Job
from layerkeep.core.log import Log

DOCKERD_LOG = Path(tempfile.gettempdir()) / "layerkeep-dockerd.log"
DEFAULT_HOST = "unix:///var/run/docker.sock"
# The sockets a dockerd started with no flags listens on (/var/run links to /run).
DAEMON_HOSTS = (DEFAULT_HOST, "unix:///run/docker.sock")
START_HINT = "start it (`sudo systemctl start docker`, or `dockerd &` as root) or set DOCKER_HOST"
_POLL = 0.5
_LOG_TAIL = 5
# What dockerd reads from its environment: where its helpers are (containerd, runc,
# docker-proxy), the proxies its pulls go through, its own temp-folder and ramdisk
# switches, and the CA bundle Go's TLS reads.
_DOCKERD_VARIABLES = (
    "PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "DOCKER_TMPDIR", "DOCKER_RAMDISK", "SSL_CERT_FILE", "SSL_CERT_DIR",
)
_SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"



def start_refusal(environ: Mapping[str, str], *, euid: int, dockerd: str | None) -> str:
    """Why layerkeep may not start an engine here ("" when it may)."""
    if (environ.get("DOCKER_HOST") or DEFAULT_HOST) not in DAEMON_HOSTS:
        return "DOCKER_HOST names another engine"
    if euid != 0:
        return "not root"
    if dockerd is None:
        return "dockerd is not installed (e.g. apt-get install docker.io)"
    return ""


def ensure_engine(
    environ: Mapping[str, str],
    *,
    timeout: float = 60.0,
    log_path: Path = DOCKERD_LOG,
    log: Log | None = None,
) -> bool:
    """Return once the engine answers, starting a local ``dockerd`` if we may.

    True when this call started it. When the engine is down and may not be started,
    EngineUnavailable says why.
    """
    if _answers(environ):
        return False
    dockerd = shutil.which("dockerd", path=environ.get("PATH"))
    reason = start_refusal(environ, euid=os.geteuid(), dockerd=dockerd)
    if reason or dockerd is None:
        raise EngineUnavailable(
            f"cannot reach the Docker engine at {describe_host(environ)}; "
            f"not starting one: {reason}",
            hint=START_HINT,
        )
    pid = _spawn_detached([dockerd], log_path, dockerd_environment(environ))
    began = time.monotonic()
    while not _answers(environ):
        exited, status = os.waitpid(pid, os.WNOHANG)
        if exited:
            raise EngineUnavailable(
                f"dockerd exited with status {os.waitstatus_to_exitcode(status)} before "
                f"answering; last lines of {log_path}: {_tail(log_path)}",
            )
        if time.monotonic() - began > timeout:
            raise EngineUnavailable(
                f"dockerd (pid {pid}) did not answer within {timeout:.0f} s; "
                f"last lines of {log_path}: {_tail(log_path)}",
                hint=f"see {log_path}",
            )
        time.sleep(_POLL)
    if log is not None:
        log(
            f"the Docker engine was not running: started {dockerd} (pid {pid}, "
            f"{time.monotonic() - began:.1f} s, log {log_path}); it keeps running afterwards"
        )
    return True


def dockerd_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` that dockerd reads, and nothing else (no LAYERKEEP_*,
    no passwords or tokens); PATH defaults to the system's."""
    kept = {name: environ[name] for name in _DOCKERD_VARIABLES if name in environ}
    kept.setdefault("PATH", _SYSTEM_PATH)
    return kept


def connect_or_start(
    environ: Mapping[str, str],
    *,
    job: Job | None = None,
    timeout: int = DEFAULT_TIMEOUT,
    log: Log,
) -> Engine:
    """:func:`~layerkeep.core.engine.connect`, after starting a local engine that is down."""
    if not _socket_answers(environ):
        ensure_engine(environ, log=log)
    return connect(environ, job=job, timeout=timeout)


def _answers(environ: Mapping[str, str]) -> bool:
    """Whether the engine answers a ping."""
    if not _socket_answers(environ):
        return False
    try:
        connect(environ).close()
    except EngineUnavailable:
        return False
    return True


def _socket_answers(environ: Mapping[str, str]) -> bool:
    """Whether a unix socket engine accepts a connection (True for other hosts).

    Probed before docker-py: it does not close the socket of a connect that fails, and
    the ResourceWarning when that is collected is an error under strict warning settings.
    """
    host = environ.get("DOCKER_HOST") or DEFAULT_HOST
    if not host.startswith("unix://"):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(host.removeprefix("unix://"))
        except OSError:
            return False
    return True


def _spawn_detached(argv: list[str], log_path: Path, environ: dict[str, str]) -> int:
    # posix_spawn rather than Popen: the daemon must outlive this process, and a Popen
    # object that is never waited for raises ResourceWarning when collected.
    fd = _open_log(log_path)
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


def _open_log(path: Path) -> int:
    """The log file, for appending: never through a symlink (it lives in the shared temp
    folder and root writes it), and only a file of our own."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)
    except OSError as error:
        raise EngineUnavailable(
            f"cannot write dockerd's log {path}: {error.strerror}", hint="remove it"
        ) from None
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        os.close(fd)
        raise EngineUnavailable(
            f"dockerd's log {path} belongs to uid {owner}; not starting dockerd with it",
            hint="remove it",
        )
    return fd


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(line.strip() for line in lines[-_LOG_TAIL:]) or "(empty)"
