"""Session setup for the tests marked ``docker``: an engine that answers, and a sweep.

Usage from ``tests/conftest.py`` (pytest puts ``tests/`` on ``sys.path``)::

    from engine_setup import ensure_engine, sweep

    @pytest.fixture(scope="session")
    def engine() -> Iterator[Engine]:
        ensure_engine(os.environ)              # starts dockerd when we may
        engine = connect(os.environ, labels=TEST_LABELS)
        ensure_standins(engine)                # official names, built from Debian
        sweep(engine, "io.layerkeep.test", "1")  # what a killed run left behind
        yield engine
        sweep(engine, "io.layerkeep.test", "1")

``ensure_engine`` starts ``dockerd`` only as root, only when ``dockerd`` is installed and
only for the local socket; the daemon gets its own session so that it outlives pytest
(the next run reuses it) and logs to ``DOCKERD_LOG``.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import docker.errors

from layerkeep.core.engine import Engine, connect, describe_host
from layerkeep.core.errors import EngineUnavailable

DOCKERD_LOG = Path("/tmp/layerkeep-dockerd.log")
DEFAULT_HOST = "unix:///var/run/docker.sock"
# The sockets a dockerd started with no flags listens on (/var/run links to /run).
DAEMON_HOSTS = (DEFAULT_HOST, "unix:///run/docker.sock")
_POLL = 0.5
_LOG_TAIL = 5


def ensure_engine(
    environ: Mapping[str, str], *, timeout: float = 60.0, log_path: Path = DOCKERD_LOG
) -> None:
    """Return once the engine answers, starting a local ``dockerd`` if we may."""
    if _answers(environ):
        return

    dockerd = shutil.which("dockerd", path=environ.get("PATH"))
    reason = ""
    if (environ.get("DOCKER_HOST") or DEFAULT_HOST) not in DAEMON_HOSTS:
        reason = "DOCKER_HOST names another engine"
    elif os.geteuid() != 0:
        reason = "not root"
    elif dockerd is None:
        reason = "dockerd is not installed (apt-get install docker.io)"
    if reason:
        raise EngineUnavailable(
            f"cannot reach the Docker engine at {describe_host(environ)}; "
            f"not starting one: {reason}",
            hint="start it (`sudo systemctl start docker`, or `dockerd &` as root) "
            "or set DOCKER_HOST",
        )

    assert dockerd is not None
    pid = _spawn_detached([dockerd], log_path, environ)
    deadline = time.monotonic() + timeout
    while not _answers(environ):
        exited, status = os.waitpid(pid, os.WNOHANG)
        if exited:
            raise EngineUnavailable(
                f"dockerd exited with status {os.waitstatus_to_exitcode(status)} before "
                f"answering; last lines of {log_path}: {_tail(log_path)}",
            )
        if time.monotonic() > deadline:
            raise EngineUnavailable(
                f"dockerd (pid {pid}) did not answer within {timeout:.0f} s; "
                f"last lines of {log_path}: {_tail(log_path)}",
                hint=f"see {log_path}",
            )
        time.sleep(_POLL)


def _answers(environ: Mapping[str, str]) -> bool:
    """Whether the engine answers a ping.

    A unix socket is probed first: docker-py does not close the socket of a connect
    that fails, and the ResourceWarning when it is collected is an error under our
    pytest settings (``filterwarnings = error``), even at the end of the session.
    """
    host = environ.get("DOCKER_HOST") or DEFAULT_HOST
    if host.startswith("unix://"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(2)
            try:
                probe.connect(host.removeprefix("unix://"))
            except OSError:
                return False
    try:
        connect(environ).close()
    except EngineUnavailable:
        return False
    return True


@dataclass(frozen=True)
class Swept:
    """What a sweep removed."""

    containers: int
    networks: int
    images: int


def sweep(
    engine: Engine, label_key: str, label_value: str, *, older_than: float = 0.0
) -> Swept:
    """Remove every container (with its anonymous volumes), network and image so labelled.

    With ``older_than`` (seconds), only containers created that long ago or earlier: what
    a killed test session left, never what a running one is using.
    """
    selector = {"label": f"{label_key}={label_value}"}
    api = engine.api
    containers = 0
    cutoff = time.time() - older_than
    for container in api.containers(all=True, filters=selector):
        if older_than and float(container["Created"]) > cutoff:
            continue
        try:
            api.remove_container(container["Id"], force=True, v=True)
        except docker.errors.NotFound:
            continue  # gone already: auto-removed, or another sweep got there first
        containers += 1
    if older_than:
        return Swept(containers=containers, networks=0, images=0)
    networks = 0
    for network in api.networks(filters=selector):
        try:
            api.remove_network(network["Id"])
        except docker.errors.NotFound:
            continue
        networks += 1
    # A labelled image may be the parent of another: remove children first by retrying
    # until a pass makes no progress.
    pending = [str(i) for i in api.images(filters=selector, quiet=True)]
    images = 0
    while pending:
        left: list[str] = []
        for image_id in pending:
            try:
                api.remove_image(image_id, force=True)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as error:
                if error.status_code != 409:
                    raise
                left.append(image_id)
                continue
            images += 1
        if len(left) == len(pending):
            break
        pending = left
    return Swept(containers=containers, networks=networks, images=images)


def _spawn_detached(argv: list[str], log_path: Path, environ: Mapping[str, str]) -> int:
    # posix_spawn rather than Popen: the daemon must outlive this process, and a Popen
    # object that is never waited for raises ResourceWarning (an error under our pytest
    # settings) when collected.
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        return os.posix_spawn(
            argv[0],
            argv,
            dict(environ),
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(fd)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(line.strip() for line in lines[-_LOG_TAIL:]) or "(empty)"
