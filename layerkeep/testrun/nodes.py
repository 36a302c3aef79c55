"""Test containers side by side, and what each test node on one machine keeps apart.

``--nodes N`` (LAYERKEEP_TEST_NODES) runs N test containers at once against the job's
services, started once. Node k gets a database of its own on the postgres service
(LAYERKEEP_DB_NAME for node 1, ``<LAYERKEEP_DB_NAME>_node<k>`` for the others; db.init
creates and initialises each) and redis database k - 1, through the test environment's
``{postgres.url}`` and ``{redis.url}``.

The containers' output is followed by one thread each; the calling thread waits for
them, so a signal reaches it, and whatever ends the wait removes every container.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.settings import Mount, Settings
from layerkeep.testrun.app_container import create_app_container

# How long the output of a container that exited may take to drain.
_DRAIN_SECONDS = 30.0


def node_database(settings: Settings, node: int) -> str:
    """The database of test node ``node`` of a run on one machine."""
    return settings.db_name if node == 1 else f"{settings.db_name}_node{node}"


def node_settings(settings: Settings, node: int) -> Settings:
    """The settings test node ``node`` runs with: its own database."""
    return replace(settings, db_name=node_database(settings, node))


def local_node_settings(settings: Settings) -> list[Settings]:
    """Each local test node's settings, node 1 first (one when LAYERKEEP_TEST_NODES=1)."""
    return [node_settings(settings, node) for node in range(1, settings.test_nodes + 1)]


@dataclass(frozen=True)
class ContainerRun:
    """One test container to run: its script, settings, mounts, output and local node."""

    settings: Settings
    script: str
    purpose: str
    mounts: tuple[Mount, ...]
    log: Log
    # The node of a run on one machine whose environment it gets (1 elsewhere).
    node: int = 1


def run_at_once(engine: Engine, runs: Sequence[ContainerRun]) -> list[tuple[int, float]]:
    """Start every run's container, follow their output, wait for all; each one's exit
    code and when its output ended (``time.monotonic()``). Every container is removed
    afterwards, whatever happens."""
    containers: list[str] = []
    followers: list[threading.Thread] = []
    ended: dict[int, float] = {}
    try:
        for run in runs:
            containers.append(
                create_app_container(
                    engine, run.settings, run.script, purpose=run.purpose,
                    mounts=run.mounts, node=run.node,
                )
            )
        for number, (run, container) in enumerate(zip(runs, containers, strict=True)):
            engine.start_container(container)
            follower = threading.Thread(
                target=_follow, args=(engine, run, container, number, ended), daemon=True
            )
            follower.start()
            followers.append(follower)
        codes = [engine.wait_container(container) for container in containers]
        for follower in followers:
            follower.join(_DRAIN_SECONDS)
        done = time.monotonic()
        return [(code, ended.get(number, done)) for number, code in enumerate(codes)]
    finally:
        for container in containers:
            engine.remove_container(container)


def _follow(
    engine: Engine, run: ContainerRun, container: str, number: int, ended: dict[int, float]
) -> None:
    mask = engine.job_for(run.settings).mask
    try:
        for line in engine.follow_output(container):
            run.log(mask(line))
    except DockerOperationError as error:
        run.log(f"warning: stopped following the tests' output: {error.one_line()}")
    ended[number] = time.monotonic()
