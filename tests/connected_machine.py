"""A machine that pulls official images, on a host that reaches no registry.

    python3 tests/connected_machine.py -- python3 -m pytest -m online

runs the command with ``DOCKER_HOST`` naming an engine that pulls
``docker.io/library/NAME:TAG`` as a connected machine does, and stops it afterwards:

- the engine is a second Debian dockerd 20.10 (``second_engine.py``: its own data root,
  bridge and address pools), started empty, whose ``registry-mirrors`` names
- a local Docker Distribution registry (``registry_setup.py``) on 127.0.0.1 holding the
  official names layerkeep's stand-ins stand for (:data:`OFFICIAL`), pushed as
  ``127.0.0.1:PORT/library/NAME:TAG``. Each is built FROM the calling engine's image of
  that name with the ``io.layerkeep.standin`` labels set to empty strings: an image
  layerkeep did not make, as a pulled official one is (it never replaces those). Their
  content is the stand-ins' (the python one trusts this host's TLS proxy for pip).

``docker pull python:3.11-slim`` then works there, and the pulled image carries repo
digests as an official one does. Names the mirror lacks still fail as offline: the
engine falls back to registry-1.docker.io, which does not resolve here. The test
session's setup pulls the images it needs (``engine_setup.ensure_images``).

Needs root (a second dockerd) and the official names present in the calling engine
(the stand-ins: ``inv standins.build``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from registry_setup import Registry, running_registry
from second_engine import SecondEngine, second_engine

from layerkeep.standins.images import STANDIN_IMAGE_LABEL, STANDIN_LABEL, STANDINS

# What a connected machine pulls and an offline one gets as stand-ins.
OFFICIAL = tuple(STANDINS)


@dataclass(frozen=True)
class ConnectedMachine:
    """The engine that pulls through the mirror, and the mirror."""

    engine: SecondEngine
    mirror: Registry
    prepared_in: float

    @property
    def docker_host(self) -> str:
        """What DOCKER_HOST takes to reach the engine."""
        return self.engine.base_url


def fill_mirror(
    source: Mapping[str, str], mirror: Registry, references: Sequence[str] = OFFICIAL
) -> None:
    """Push ``references`` from the ``source`` engine (a client environment) into
    ``mirror`` as Docker Hub's library images, each without layerkeep's stand-in labels."""
    unlabel = " ".join(f'{label}=""' for label in (STANDIN_LABEL, STANDIN_IMAGE_LABEL))
    for reference in references:
        target = f"{mirror.address}/library/{reference}"
        try:
            _docker(source, ["build", "-q", "-t", target, "-"],
                    stdin=f"FROM {reference}\nLABEL {unlabel}\n")
            _docker(source, ["push", "-q", target])
        finally:
            _docker(source, ["rmi", target], check=False)


@contextlib.contextmanager
def connected_machine(folder: Path, source: Mapping[str, str]) -> Iterator[ConnectedMachine]:
    """The mirror, filled from ``source``, and an empty engine pulling through it."""
    began = time.monotonic()
    with running_registry(folder / "mirror") as mirror:
        fill_mirror(source, mirror)
        mirrors = {"registry-mirrors": [f"http://{mirror.address}"]}
        with second_engine(folder / "engine", daemon_config=mirrors) as engine:
            yield ConnectedMachine(engine, mirror, time.monotonic() - began)


def _docker(
    environ: Mapping[str, str], arguments: list[str], *, stdin: str = "", check: bool = True
) -> str:
    done = subprocess.run(
        ["docker", *arguments], env=dict(environ), input=stdin, capture_output=True,
        text=True, check=False,
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(arguments)} failed: {done.stderr.strip()}")
    return done.stdout


def _stop_on(signum: int, _: FrameType | None) -> None:
    # The finally blocks above stop the engine and the mirror.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str]) -> int:
    """Run the command after ``--`` against the connected machine; its exit status."""
    if not argv or argv[0] != "--" or len(argv) < 2:
        sys.exit("usage: connected_machine.py -- COMMAND [ARGS...]")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop_on)
    with (
        tempfile.TemporaryDirectory(prefix="layerkeep-connected-") as folder,
        connected_machine(Path(folder), os.environ) as machine,
    ):
        print(
            f"connected machine: DOCKER_HOST={machine.docker_host}, mirror "
            f"{machine.mirror.address} with {', '.join(OFFICIAL)} "
            f"(ready in {machine.prepared_in:.0f} s)",
            flush=True,
        )
        command = subprocess.Popen(
            list(argv[1:]), env={**os.environ, "DOCKER_HOST": machine.docker_host}
        )
        try:
            return command.wait()
        finally:
            if command.poll() is None:
                command.terminate()
                command.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
