"""A second, throw-away Docker engine on this host: "another machine" for cache tests.

    with second_engine(tmp_path) as second:                      # Debian's dockerd 20.10
    with second_engine(tmp_path, docker26=ensure_docker26()) as second:          # 26.1.5
    with second_engine(tmp_path, docker26=..., containerd_store=True) as second:
        client = docker.DockerClient(base_url=second.base_url)   # or from_env(environment=...)
        subprocess.run(["docker", "images"], env=second.environ)  # its own CLI and buildx
    second.started_in, second.stopped_in   # seconds

Docker 26.1.5 comes from Debian trixie packages, downloaded with a private apt state and
unpacked (never installed) once into ``/var/cache/layerkeep-docker26/<version>`` by
``ensure_docker26`` (``python3 tests/second_engine.py prepare`` does it up front in CI).
trixie's ``runc`` and ``tini`` are left out: they need glibc 2.38; bookworm's ``runc``
works with dockerd 26. Its engine gets a private ``DOCKER_CONFIG`` holding the buildx
0.13.1 plugin, so ``docker build`` there uses BuildKit (buildx's ``docker`` driver);
``containerd_store`` turns on the containerd image store (Docker 29's default).

It runs its own ``dockerd`` (as root) beside the main one without touching it:

- ``--data-root`` in a fresh folder under ``/var/tmp`` (on disk, like /var/lib/docker:
  layers can be large), so it starts with no images, containers or layers at all;
  dockerd bind-mounts it onto itself (shared propagation) while it runs;
- ``--exec-root`` (run state, its sockets, ``--pidfile``, ``--host unix://...``) in a short
  folder under ``/tmp``: unix socket paths may not exceed 107 bytes, and the exec root
  holds ``containerd/containerd.sock.ttrpc``;
- its own managed containerd per exec root, with its own namespaces
  (``--containerd-namespace``, ``--containerd-plugins-namespace``);
- its own /20 of 198.18.0.0/15 (the range set aside for network tests): the first /24 on
  its default bridge (``--bridge=<name>``, an interface this module creates and deletes
  afterwards), the upper /21 as its ``default-address-pools`` for user-defined networks,
  so its networks never collide with the main engine's. NOT ``--bridge=none``: with it,
  dockerd *deletes the host's ``docker0`` interface* at start-up
  (``removeDefaultBridgeInterface``), which breaks the main engine's default network;
- ``--iptables=false``: a dockerd that manages iptables *flushes and deletes* the
  ``DOCKER`` chains of the nat and filter tables at start-up (``removeIPChains``), which
  would drop every port the main engine publishes. The main engine's FORWARD policy is
  DROP and bridged traffic goes through iptables (``bridge-nf-call-iptables=1``), so this
  module opens the firewall for the engine's /20 itself: two FORWARD rules (to and from
  the block) and one MASQUERADE rule (out of it), each commented with the bridge's name,
  removed when the engine stops. Containers then reach each other on its user-defined
  networks, and builds reach the package mirrors, as on a real machine;
- its own ``--config-file`` (so ``/etc/docker/daemon.json`` does not apply); on 20.10 it
  moves the identity key (``deprecated-key-path``) out of ``/etc/docker/key.json``:
  otherwise both engines report the same ``docker info`` ID.

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
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from clean_env import clean_environ

DATA_PARENT = Path("/var/tmp")
EXEC_PARENT = Path("/tmp")
PREFIX = "layerkeep-engine2-"
BRIDGE_PREFIX = "lkeng2-"  # + 8 hex digits: 15 characters, the longest interface name
# RFC 2544's benchmarking range: neither Docker's default pools nor real networks use it.
BRIDGE_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
BLOCK_PREFIX = 20  # each engine's share: its bridge's /24 and a /21 of network pools
_SOCKET_MAX = 107  # sun_path is 108 bytes with the trailing NUL
_POLL = 0.05
_LOG_TAIL = 10
# Variables that would point a docker client elsewhere than DOCKER_HOST.
_CLIENT_VARIABLES = ("DOCKER_CONTEXT", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH")

DOCKER26_VERSION = "26.1.5"
BUILDX_VERSION = "0.13.1"
DOCKER26_ROOT = Path("/var/cache/layerkeep-docker26")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Package -> the upstream version it must carry: the folder is keyed by these.
DOCKER26_PACKAGES = {
    "docker.io": DOCKER26_VERSION,
    "docker-cli": DOCKER26_VERSION,
    "docker-buildx": BUILDX_VERSION,
    "containerd": "1.7.",
}


class SecondEngineUnavailable(RuntimeError):
    """This machine cannot run a second engine (not root, no dockerd): a reason to skip."""


@dataclass(frozen=True)
class Docker26:
    """Docker 26 unpacked from Debian trixie packages under ``prefix``."""

    prefix: Path

    @property
    def dockerd(self) -> Path:
        """The engine."""
        return self.prefix / "usr" / "sbin" / "dockerd"

    @property
    def docker(self) -> Path:
        """Its CLI."""
        return self.prefix / "usr" / "bin" / "docker"

    @property
    def buildx(self) -> Path:
        """The buildx CLI plugin."""
        return self.prefix / "usr" / "libexec" / "docker" / "cli-plugins" / "docker-buildx"

    @property
    def path(self) -> str:
        """PATH entries to put first: its containerd, shims, docker-proxy and CLI."""
        return f"{self.prefix / 'usr' / 'sbin'}:{self.prefix / 'usr' / 'bin'}"


def ensure_docker26(root: Path = DOCKER26_ROOT, *, mirror: str = DEBIAN_MIRROR) -> Docker26:
    """Docker 26 from trixie's packages, downloaded and unpacked once (idempotent).

    The apt state (sources, lists, archives) is private to a temp folder: the system
    stays bookworm and nothing is installed. The unpacked tree is moved into place in
    one rename, so a half-done run never counts as done.
    """
    home = root / DOCKER26_VERSION
    install = Docker26(home / "prefix")
    if (home / "complete").is_file():
        return install
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise SecondEngineUnavailable(f"{tool} is missing: Docker 26 comes from .debs")
    if os.geteuid() != 0:
        raise SecondEngineUnavailable("Docker 26 engines need root")
    home.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="download-", dir=root))
    try:
        sources = work / "sources.list"
        sources.write_text(f"deb {mirror} trixie main\n")
        for folder in ("lists/partial", "archives/partial", "debs", "prefix"):
            (work / folder).mkdir(parents=True)
        apt = [
            "apt-get", "-q",
            "-o", f"Dir::Etc::sourcelist={sources}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={work / 'lists'}",
            "-o", f"Dir::Cache={work}",  # its pkgcache.bin too, not the system's
            "-o", f"Dir::Cache::archives={work / 'archives'}",
            # The _apt user cannot write into this root-owned folder.
            "-o", "APT::Sandbox::User=root",
        ]
        _run([*apt, "update"])
        _run([*apt, "download", *DOCKER26_PACKAGES], cwd=work / "debs")
        versions = {}
        for deb in sorted((work / "debs").glob("*.deb")):
            package = _run(["dpkg-deb", "-f", str(deb), "Package"]).strip()
            version = _run(["dpkg-deb", "-f", str(deb), "Version"]).strip()
            if not version.startswith(DOCKER26_PACKAGES[package]):
                raise RuntimeError(
                    f"trixie's {package} is {version}, not {DOCKER26_PACKAGES[package]}: "
                    "update DOCKER26_PACKAGES in tests/second_engine.py"
                )
            versions[package] = version
            _run(["dpkg-deb", "-x", str(deb), str(work / "prefix")])
        with contextlib.suppress(OSError):  # another process finished first: use theirs
            (work / "prefix").rename(install.prefix)
        (home / "complete").write_text(json.dumps(versions, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return install


@dataclass
class SecondEngine:
    """A running second engine and how to reach it."""

    base_url: str
    environ: Mapping[str, str]
    data_root: Path
    exec_root: Path
    bridge: str
    bridge_address: str
    address_block: str
    version: str
    containerd_store: bool
    log: Path
    pid: int
    started_in: float
    stopped_in: float | None = None
    killed: bool = False
    leftovers: list[str] = field(default_factory=list)

    def prune_builder(self) -> None:
        """Empty this engine's builder cache: a throw-away engine's cache is all ours."""
        cli = shutil.which("docker", path=self.environ.get("PATH")) or "docker"
        subprocess.run(
            [cli, "builder", "prune", "--all", "--force"],
            env=dict(self.environ), capture_output=True, check=True,
        )


def dockerd_flags(
    data_root: Path, exec_root: Path, config_file: Path, bridge: str, *, storage_driver: bool = True
) -> list[str]:
    """Every flag the second dockerd needs to live beside the main one."""
    namespace = f"lk-{bridge.removeprefix(BRIDGE_PREFIX)}"
    return [
        f"--config-file={config_file}",
        f"--data-root={data_root}",
        f"--exec-root={exec_root}",
        f"--pidfile={exec_root / 'docker.pid'}",
        f"--host=unix://{exec_root / 'docker.sock'}",
        f"--containerd-namespace={namespace}",
        f"--containerd-plugins-namespace={namespace}-plugins",
        *(["--storage-driver=overlay2"] if storage_driver else []),
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
    docker26: Docker26 | None = None,
    containerd_store: bool = False,
    timeout: float = 60.0,
    stop_timeout: float = 45.0,
    data_parent: Path = DATA_PARENT,
    exec_parent: Path = EXEC_PARENT,
    daemon_config: Mapping[str, object] | None = None,
) -> Iterator[SecondEngine]:
    """Run a second dockerd until the block ends, then remove every trace of it.

    Without ``docker26`` it is the system's dockerd (Debian's 20.10). ``folder`` keeps
    its log, configuration and ``DOCKER_CONFIG``. ``stop_timeout`` must exceed dockerd's
    own shutdown timeout (15 s for running containers) before SIGKILL is used.
    ``daemon_config`` adds keys to its daemon.json (``registry-mirrors``, say).
    """
    if containerd_store and docker26 is None:
        raise ValueError("the containerd image store needs docker26 (20.10 lacks it)")
    dockerd = _dockerd(docker26)
    folder.mkdir(parents=True, exist_ok=True)
    data_root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=data_parent))
    exec_root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=exec_parent))
    bridge = f"{BRIDGE_PREFIX}{secrets.token_hex(4)}"
    process: subprocess.Popen[bytes] | None = None
    engine: SecondEngine | None = None
    rules: list[list[str]] = []
    try:
        block, bridge_address = _create_bridge(bridge)
        rules = _open_firewall(block, bridge)
        longest = exec_root / "containerd" / "containerd.sock.ttrpc"
        if len(os.fsencode(longest)) > _SOCKET_MAX:
            raise RuntimeError(f"exec root {exec_root} is too deep for unix sockets")
        config_file = folder / "daemon.json"
        config_file.write_text(
            json.dumps(
                {
                    **_daemon_config(block, exec_root, docker26, containerd_store),
                    **(daemon_config or {}),
                }
            )
        )
        log = folder / "dockerd.log"
        socket_path = exec_root / "docker.sock"
        daemon_env = dict(os.environ)
        if docker26 is not None:
            # Its own containerd, shims and docker-proxy; runc stays bookworm's.
            daemon_env["PATH"] = f"{docker26.path}:{os.environ.get('PATH', os.defpath)}"
        argv = [
            dockerd,
            *dockerd_flags(
                data_root, exec_root, config_file, bridge, storage_driver=not containerd_store
            ),
        ]
        began = time.monotonic()
        with log.open("wb") as output:
            # Its own session: a Ctrl-C meant for pytest must not reach dockerd before
            # the cleanup below runs.
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=daemon_env,
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
        # No CI or layerkeep variables: tests load settings and start `inv` with it.
        environ = {k: v for k, v in clean_environ().items() if k not in _CLIENT_VARIABLES}
        environ["DOCKER_HOST"] = f"unix://{socket_path}"
        environ["DOCKER_CONFIG"] = str(_docker_config(folder, docker26))
        if docker26 is not None:
            environ["PATH"] = f"{docker26.docker.parent}:{environ.get('PATH', os.defpath)}"
        engine = SecondEngine(
            base_url=environ["DOCKER_HOST"],
            environ=environ,
            data_root=data_root,
            exec_root=exec_root,
            bridge=bridge,
            bridge_address=bridge_address,
            address_block=str(block),
            version=_server_version(environ),
            containerd_store=containerd_store,
            log=log,
            pid=process.pid,
            started_in=time.monotonic() - began,
        )
        yield engine
    finally:
        stopped_in, killed = _stop(process, stop_timeout)
        leftovers = _remove_traces(data_root, exec_root)
        _close_firewall(rules)
        _ip("link", "delete", bridge, check=False)
        if engine is not None:
            engine.stopped_in, engine.killed, engine.leftovers = stopped_in, killed, leftovers


def _dockerd(docker26: Docker26 | None) -> str:
    """The dockerd to run, once this machine is known to be able to run it."""
    dockerd = str(docker26.dockerd) if docker26 else shutil.which("dockerd")
    if os.geteuid() != 0:
        raise SecondEngineUnavailable("a second dockerd needs root")
    if dockerd is None:
        raise SecondEngineUnavailable("dockerd is not installed (apt-get install docker.io)")
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            raise SecondEngineUnavailable(f"{tool} is not installed (apt-get install {tool})")
    return dockerd


def _daemon_config(
    block: ipaddress.IPv4Network, exec_root: Path, docker26: Docker26 | None, containerd: bool
) -> dict[str, object]:
    """daemon.json: network pools in the engine's block, and the image store asked for."""
    pools = list(block.subnets(new_prefix=BLOCK_PREFIX + 1))[1]
    config: dict[str, object] = {"default-address-pools": [{"base": str(pools), "size": 24}]}
    if docker26 is None:
        # 20.10 keeps its identity in key.json; 26 keeps it in the data root already.
        config["deprecated-key-path"] = str(exec_root / "key.json")
    if containerd:
        config["features"] = {"containerd-snapshotter": True}
    return config


def transfer_images(
    source: Mapping[str, str], target: Mapping[str, str], images: Sequence[str]
) -> float:
    """``docker save IMAGES | docker load`` from one engine to another; the seconds it took.

    ``source`` and ``target`` are client environments (DOCKER_HOST and PATH).
    """
    began = time.monotonic()
    save_cli = shutil.which("docker", path=source.get("PATH")) or "docker"
    load_cli = shutil.which("docker", path=target.get("PATH")) or "docker"
    with subprocess.Popen(
        [save_cli, "save", *images], env=dict(source), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as saver:
        loaded = subprocess.run(
            [load_cli, "load", "-q"], env=dict(target), stdin=saver.stdout,
            capture_output=True, text=True, check=False,
        )
        assert saver.stdout is not None
        assert saver.stderr is not None
        saver.stdout.close()
        saved_errors = saver.stderr.read().decode(errors="replace")
    if saver.returncode != 0 or loaded.returncode != 0:
        raise RuntimeError(
            f"moving {', '.join(images)} failed: {saved_errors.strip()} {loaded.stderr.strip()}"
        )
    return time.monotonic() - began


def firewall_rules() -> list[str]:
    """The host's iptables rules (filter and nat), for before/after comparisons."""
    rules = []
    for table in ("filter", "nat"):
        listed = _run(["iptables", "-t", table, "-S"])
        rules += [f"{table} {line}" for line in listed.splitlines()]
    return rules


def _docker_config(folder: Path, docker26: Docker26 | None) -> Path:
    """A private DOCKER_CONFIG: the user's config and plugins never apply; 26 gets buildx."""
    config = folder / "docker-config"
    (config / "cli-plugins").mkdir(parents=True, exist_ok=True)
    if docker26 is not None:
        plugin = config / "cli-plugins" / "docker-buildx"
        if not plugin.exists():
            plugin.symlink_to(docker26.buildx)
    return config


def _server_version(environ: Mapping[str, str]) -> str:
    cli = shutil.which("docker", path=environ.get("PATH")) or "docker"
    return _run([cli, "version", "--format", "{{.Server.Version}}"], env=environ).strip()


def _create_bridge(name: str) -> tuple[ipaddress.IPv4Network, str]:
    """Create bridge ``name`` on a /20 no route or address uses; the block and its address."""
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
    candidates = list(BRIDGE_RANGE.subnets(new_prefix=BLOCK_PREFIX))
    random.shuffle(candidates)  # two engines started at once rarely pick the same one
    for block in candidates:
        if not any(block.overlaps(used) for used in taken):
            break
    else:
        raise RuntimeError(f"no free /{BLOCK_PREFIX} left in {BRIDGE_RANGE} for the second engine")
    subnet = next(block.subnets(new_prefix=24))
    address = f"{next(subnet.hosts())}/{subnet.prefixlen}"
    _ip("link", "add", "name", name, "type", "bridge")
    _ip("address", "add", address, "dev", name)
    _ip("link", "set", name, "up")
    return block, address


def _open_firewall(block: ipaddress.IPv4Network, bridge: str) -> list[list[str]]:
    """Let the block's containers talk to each other and out (NAT); the rules to delete."""
    comment = ["-m", "comment", "--comment", f"layerkeep second engine {bridge}"]
    rules = [
        ["-t", "filter", "FORWARD", "-s", str(block), *comment, "-j", "ACCEPT"],
        ["-t", "filter", "FORWARD", "-d", str(block), *comment, "-j", "ACCEPT"],
        ["-t", "nat", "POSTROUTING", "-s", str(block), "!", "-d", str(block), *comment,
         "-j", "MASQUERADE"],
    ]
    added = []
    for table, name, chain, *rule in rules:
        _run(["iptables", "-w", table, name, "-I", chain, "1", *rule])
        added.append([table, name, chain, *rule])
    return added


def _close_firewall(rules: list[list[str]]) -> None:
    for table, name, chain, *rule in rules:
        subprocess.run(
            ["iptables", "-w", table, name, "-D", chain, *rule], capture_output=True, check=False
        )


def _run(
    argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> str:
    done = subprocess.run(
        list(argv), cwd=cwd, env=None if env is None else dict(env),
        capture_output=True, text=True, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout


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


if __name__ == "__main__":
    # `python3 tests/second_engine.py prepare`: CI downloads Docker 26 once, up front.
    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: second_engine.py prepare")
    print(f"Docker {DOCKER26_VERSION} in {ensure_docker26().prefix}")
