"""A second, throw-away Docker engine on this host: "another machine" for cache tests.

    with second_engine(tmp_path) as second:
        client = docker.DockerClient(base_url=second.base_url)   # or from_env(environment=...)
        subprocess.run(["docker", "images"], env=second.environ)
    second.started_in, second.stopped_in   # seconds

It runs its own ``dockerd`` (as root) beside the main one without touching it:

- ``--data-root`` in a fresh folder under ``/var/tmp`` (on disk, like /var/lib/docker:
  layers can be large; overlay2 also works on tmpfs with this 6.x kernel, at the cost of
  RAM), so it starts with no images, containers or layers at all; dockerd bind-mounts
  it onto itself (shared propagation) while it runs, as it does /var/lib/docker;
- ``--exec-root`` (run state, its sockets, ``--pidfile``, ``--host unix://...``) in a short
  folder under ``/tmp``: unix socket paths may not exceed 107 bytes, and the exec root
  holds ``containerd/containerd.sock.ttrpc``;
- its own containerd: dockerd 20.10 starts a managed containerd per exec root
  (``<exec-root>/containerd/containerd.sock``), so nothing is shared with the main one;
- its own bridge (``--bridge=<name>``: an interface this module creates with a free /24
  of 198.18.0.0/15, the range set aside for network tests, and deletes afterwards) and
  ``--iptables=false --ip6tables=false --ip-masq=false --ip-forward=false``: no iptables
  rule or sysctl is touched, so the main engine's networking is untouched. NOT
  ``--bridge=none``: with it, dockerd 20.10 *deletes the host's ``docker0`` interface*
  at start-up (``removeDefaultBridgeInterface``), which breaks every container and build
  of the main engine on its default network until ``docker0`` is recreated;
- so containers of the second engine get an address on that bridge but no way out (no
  NAT, and the main engine's FORWARD policy is DROP). Pulls and pushes are made by the
  daemon itself on the host network, so a registry on 127.0.0.1 is reachable. A build
  whose RUN steps need the network (apt-get, pip) must ask for ``network_mode="host"``
  (docker-py) or ``--network host`` (CLI); steps that do not, or that come from the
  cache, need nothing;
- its own ``--config-file`` (so ``/etc/docker/daemon.json`` does not apply), which moves
  the identity key (``deprecated-key-path``) out of ``/etc/docker/key.json``: otherwise
  both engines report the same ``docker info`` ID.

On exit it is stopped with SIGTERM (dockerd stops its containers, unmounts their
overlays and its self-bind-mounted data root, and stops its containerd), then SIGKILL if
that takes too long; whatever is left (runc containers, containerd or shims that name
the exec root, mounts under either root: the ``netns/default`` nsfs mount stays even
after a clean shutdown) is removed before both folders are deleted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DATA_PARENT = Path("/var/tmp")
EXEC_PARENT = Path("/tmp")
PREFIX = "layerkeep-engine2-"
BRIDGE_PREFIX = "lkeng2-"  # + 8 hex digits: 15 characters, the longest interface name
# RFC 2544's benchmarking range: neither Docker's default pools nor real networks use it.
BRIDGE_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
_SOCKET_MAX = 107  # sun_path is 108 bytes with the trailing NUL
_POLL = 0.05
_LOG_TAIL = 10
# Variables that would point a docker client elsewhere than DOCKER_HOST.
_CLIENT_VARIABLES = ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")


class SecondEngineUnavailable(RuntimeError):
    """This machine cannot run a second engine (not root, no dockerd): a reason to skip."""


@dataclass
class SecondEngine:
    """A running second engine and how to reach it."""

    base_url: str
    environ: Mapping[str, str]
    data_root: Path
    exec_root: Path
    bridge: str
    bridge_address: str
    log: Path
    pid: int
    started_in: float
    stopped_in: float | None = None
    killed: bool = False
    leftovers: list[str] = field(default_factory=list)


def dockerd_flags(data_root: Path, exec_root: Path, config_file: Path, bridge: str) -> list[str]:
    """Every flag the second dockerd needs to live beside the main one."""
    return [
        f"--config-file={config_file}",
        f"--data-root={data_root}",
        f"--exec-root={exec_root}",
        f"--pidfile={exec_root / 'docker.pid'}",
        f"--host=unix://{exec_root / 'docker.sock'}",
        "--storage-driver=overlay2",
        f"--bridge={bridge}",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
        "--ip-forward=false",
    ]


@contextlib.contextmanager
def second_engine(
    folder: Path,
    *,
    timeout: float = 60.0,
    stop_timeout: float = 45.0,
    data_parent: Path = DATA_PARENT,
    exec_parent: Path = EXEC_PARENT,
) -> Iterator[SecondEngine]:
    """Run a second dockerd until the block ends, then remove every trace of it.

    ``folder`` keeps its log and configuration. ``stop_timeout`` must exceed dockerd's
    own shutdown timeout (15 s for running containers) before SIGKILL is used.
    """
    dockerd = shutil.which("dockerd")
    if os.geteuid() != 0:
        raise SecondEngineUnavailable("a second dockerd needs root")
    if dockerd is None:
        raise SecondEngineUnavailable("dockerd is not installed (apt-get install docker.io)")
    if shutil.which("ip") is None:
        raise SecondEngineUnavailable("ip is not installed (apt-get install iproute2)")
    folder.mkdir(parents=True, exist_ok=True)
    data_root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=data_parent))
    exec_root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=exec_parent))
    bridge = f"{BRIDGE_PREFIX}{secrets.token_hex(4)}"
    process: subprocess.Popen[bytes] | None = None
    engine: SecondEngine | None = None
    try:
        bridge_address = _create_bridge(bridge)
        longest = exec_root / "containerd" / "containerd.sock.ttrpc"
        if len(os.fsencode(longest)) > _SOCKET_MAX:
            raise RuntimeError(f"exec root {exec_root} is too deep for unix sockets")
        config_file = folder / "daemon.json"
        config_file.write_text(json.dumps({"deprecated-key-path": str(exec_root / "key.json")}))
        log = folder / "dockerd.log"
        socket_path = exec_root / "docker.sock"
        argv = [dockerd, *dockerd_flags(data_root, exec_root, config_file, bridge)]
        began = time.monotonic()
        with log.open("wb") as output:
            # Its own session: a Ctrl-C meant for pytest must not reach dockerd before
            # the cleanup below runs.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = began + timeout
        while not _pings(socket_path):
            if process.poll() is not None:
                raise RuntimeError(
                    f"second dockerd exited with status {process.returncode}: {_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"second dockerd did not answer in {timeout:.0f} s: {_tail(log)}"
                )
            time.sleep(_POLL)
        environ = {k: v for k, v in os.environ.items() if k not in _CLIENT_VARIABLES}
        environ["DOCKER_HOST"] = f"unix://{socket_path}"
        engine = SecondEngine(
            base_url=environ["DOCKER_HOST"],
            environ=environ,
            data_root=data_root,
            exec_root=exec_root,
            bridge=bridge,
            bridge_address=bridge_address,
            log=log,
            pid=process.pid,
            started_in=time.monotonic() - began,
        )
        yield engine
    finally:
        stopped_in, killed = _stop(process, stop_timeout)
        leftovers = _remove_traces(data_root, exec_root)
        _ip("link", "delete", bridge, check=False)
        if engine is not None:
            engine.stopped_in, engine.killed, engine.leftovers = stopped_in, killed, leftovers


def _create_bridge(name: str) -> str:
    """Create bridge ``name`` with the first address of a /24 no route or address uses."""
    taken = [
        ipaddress.ip_network(route["dst"], strict=False)
        for route in json.loads(_ip("-4", "-j", "route", "show", "table", "all"))
        if route.get("dst", "default") != "default"
    ]
    taken += [
        ipaddress.ip_network(f"{address['local']}/{address['prefixlen']}", strict=False)
        for link in json.loads(_ip("-4", "-j", "address", "show"))
        for address in link.get("addr_info", [])
    ]
    candidates = list(BRIDGE_RANGE.subnets(new_prefix=24))
    random.shuffle(candidates)  # two engines started at once rarely pick the same one
    for subnet in candidates:
        if not any(subnet.overlaps(used) for used in taken):
            break
    else:
        raise RuntimeError(f"no free /24 left in {BRIDGE_RANGE} for the second engine")
    address = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    _ip("link", "add", "name", name, "type", "bridge")
    _ip("address", "add", address, "dev", name)
    _ip("link", "set", name, "up")
    return address


def _ip(*arguments: str, check: bool = True) -> str:
    done = subprocess.run(["ip", *arguments], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(arguments)} failed: {done.stderr.strip()}")
    return done.stdout


def _pings(socket_path: Path) -> bool:
    """Whether the engine on ``socket_path`` answers ``GET /_ping`` with OK.

    Raw HTTP on the socket, not docker-py: a failed docker-py connect leaves a socket
    whose ResourceWarning is an error under this project's pytest settings.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        try:
            probe.connect(os.fspath(socket_path))
            probe.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            answer = b""
            while chunk := probe.recv(4096):
                answer += chunk
        except OSError:
            return False
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.startswith(b"HTTP/1.") and b" 200 " in head.split(b"\r\n")[0] and body == b"OK"


def _stop(process: subprocess.Popen[bytes] | None, stop_timeout: float) -> tuple[float, bool]:
    """SIGTERM, wait, then SIGKILL; return the seconds it took and whether it was killed."""
    began = time.monotonic()
    if process is None:
        return 0.0, False
    killed = False
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=stop_timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            killed = True
    return time.monotonic() - began, killed


def _remove_traces(data_root: Path, exec_root: Path) -> list[str]:
    """Remove what a dead second engine left; describe each thing that had to be removed."""
    leftovers: list[str] = []
    runc_root = exec_root / "runtime-runc" / "moby"
    if runc_root.is_dir():
        listed = subprocess.run(
            ["runc", "--root", str(runc_root), "list", "-q"],
            capture_output=True,
            text=True,
            check=False,
        )
        for container in listed.stdout.split():
            subprocess.run(
                ["runc", "--root", str(runc_root), "delete", "--force", container],
                capture_output=True,
                check=False,
            )
            leftovers.append(f"runc container {container}")
    for pid in _processes_naming(exec_root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            leftovers.append(f"process {pid}")
    for mount_point in _mounts_under(data_root, exec_root):
        # Deepest first; a busy mount is detached lazily so the folders can go.
        done = subprocess.run(["umount", mount_point], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "--lazy", mount_point], capture_output=True, check=False)
        leftovers.append(f"mount {mount_point}")
    for root in (data_root, exec_root):
        shutil.rmtree(root, ignore_errors=True)
        if root.exists():
            leftovers.append(f"could not delete {root}")
    return leftovers


def _processes_naming(exec_root: Path) -> list[int]:
    """Processes whose command line mentions ``exec_root``: its containerd and shims."""
    needle = os.fsencode(exec_root)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle + b"/" in command:
            found.append(int(entry.name))
    return found


def _mounts_under(*roots: Path) -> list[str]:
    """Mount points at or under any of ``roots``, deepest first."""
    prefixes = [os.fspath(root) for root in roots]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape(line.split()[4])
        if any(point == prefix or point.startswith(prefix + "/") for prefix in prefixes):
            points.append(point)
    return sorted(set(points), key=lambda p: p.count("/"), reverse=True)


def _unescape(field: str) -> str:
    r"""Undo mountinfo's octal escapes (``\040`` for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return " | ".join(line.strip() for line in lines[-_LOG_TAIL:]) or "(empty log)"
