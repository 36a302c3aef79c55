"""A real Docker Distribution registry (Debian's docker-registry) on 127.0.0.1 for tests.

    with running_registry(tmp_path) as registry:               # no auth
    with running_registry(tmp_path, user="alice", password="s3cret") as registry:
        registry.address        # "127.0.0.1:PORT", what LAYERKEEP_REGISTRY takes
        registry.get("/v2/_catalog")   # (status, parsed JSON or None, headers)

The engine treats 127.0.0.0/8 registries as insecure, so plain HTTP works.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGISTRY_BINARY = "docker-registry"
MANIFEST_TYPES = ",".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)


@dataclass
class Registry:
    """A registry process and how to reach it."""

    address: str
    user: str
    password: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, *, method: str = "GET") -> tuple[int, Any, Mapping[str, str]]:
        """Call the registry's HTTP API with the test credentials."""
        request = urllib.request.Request(f"http://{self.address}{path}", method=method)
        request.add_header("Accept", MANIFEST_TYPES)
        if self.user:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
                body = answer.read()
                status, headers = answer.status, dict(answer.headers)
        except urllib.error.HTTPError as error:
            body, status, headers = error.read(), error.code, dict(error.headers)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        return status, data, headers

    def digest_of(self, repository: str, tag: str) -> str | None:
        """The manifest digest a tag resolves to, or None."""
        status, _, headers = self.get(f"/v2/{repository}/manifests/{tag}", method="HEAD")
        return headers.get("Docker-Content-Digest") if status == 200 else None

    def stop(self) -> None:
        """Stop the registry (what a registry outage looks like)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_registry(
    folder: Path, *, user: str = "", password: str = "", port: int = 0
) -> Iterator[Registry]:
    """Start a registry storing into ``folder``; htpasswd auth when ``user`` is given."""
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    auth = ""
    if user:
        hashed = subprocess.run(
            ["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True
        ).stdout
        (folder / "htpasswd").write_text(hashed)
        auth = f"auth:\n  htpasswd:\n    realm: layerkeep-test\n    path: {folder / 'htpasswd'}\n"
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    log = folder / "registry.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=output, stderr=subprocess.STDOUT
        )
    registry = Registry(f"127.0.0.1:{port}", user, password, process, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, _ = registry.get("/v2/")
            except (urllib.error.URLError, ConnectionError):
                status = 0
            if status == 200:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield registry
    finally:
        registry.stop()
