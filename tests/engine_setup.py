"""Session setup for the tests marked ``docker``: an engine that answers, and a sweep.

Usage from ``tests/conftest.py`` (pytest puts ``tests/`` on ``sys.path``)::

    from engine_setup import ensure_engine, sweep

    @pytest.fixture(scope="session")
    def engine() -> Iterator[Engine]:
        ensure_engine(os.environ)              # starts dockerd when we may
        engine = connect(os.environ, labels=TEST_LABELS)
        ensure_images(engine)                  # pulled, else stand-ins built from Debian
        sweep(engine, "io.layerkeep.test", "1")  # what a killed run left behind
        yield engine
        sweep(engine, "io.layerkeep.test", "1")

``ensure_engine`` is the library's (``layerkeep.core.engine_start``), the same that `inv`
tasks use: it starts ``dockerd`` only as root, only when ``dockerd`` is installed and only
for the local socket; the daemon outlives pytest (the next run reuses it).

``ensure_images`` gets the official images the tests use as a connected machine does, by
pulling them, and builds stand-ins (``inv standins.build``) only for those no registry
serves: a stand-in never takes the name of an image that could be pulled, and an image
already present, pulled or a stand-in, is left as it is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import docker.errors

from layerkeep.core.engine import Engine, connect
from layerkeep.core.engine_start import ensure_engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.imageref import parse_image_ref
from layerkeep.core.registry import pull_tag
from layerkeep.core.registry_credentials import Credentials
from layerkeep.core.registry_failures import Retries, unreachable_registry
from layerkeep.standins.images import STANDINS, ensure_standins

__all__ = ["Swept", "ensure_engine", "ensure_images", "pull_missing", "sweep"]
# A pull of one official image, retries included (postgres is about 150 MB).
PULL_TIME_LIMIT = 600


def pull_missing(
    engine: Engine, references: Sequence[str], *, log: Callable[[str], None] = print
) -> list[str]:
    """Pull those of ``references`` the engine lacks; return the ones still missing.

    Once a pull finds no registry reachable at all, the rest are not tried.
    """
    missing = [reference for reference in references if engine.image_id(reference) is None]
    for index, reference in enumerate(missing):
        ref = parse_image_ref(reference)
        assert ref is not None, reference
        try:
            pull_tag(engine, ref, Credentials("docker.io"), Retries(2, log, PULL_TIME_LIMIT))
        except DockerOperationError as error:
            if unreachable_registry(error.message) is not None:
                log(f"no registry reachable ({error.message}): stand-ins for the rest")
                return missing[index:]
            log(f"{reference}: {error.message}")
    return [reference for reference in missing if engine.image_id(reference) is None]


def ensure_images(engine: Engine, *, log: Callable[[str], None] = print) -> list[str]:
    """Every official image the tests use present: pulled, else a stand-in built.

    Returns the stand-ins built.
    """
    unpulled = pull_missing(engine, list(STANDINS), log=log)
    return ensure_standins(engine, names=unpulled, log=log) if unpulled else []


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


if __name__ == "__main__":
    # `python3 tests/engine_setup.py`: CI gets the engine's images once, before the runs
    # that share it start.
    ensure_engine(os.environ)
    with connect(os.environ) as engine:
        ensure_images(engine)
