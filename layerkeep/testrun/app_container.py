"""Run a shell script inside the app image on the job's network, output streamed live."""

from __future__ import annotations

import os
from collections.abc import Sequence

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError
from layerkeep.core.log import Log
from layerkeep.core.settings import Mount, Settings, render_template
from layerkeep.services.containers import service_facts

REPORTS_MOUNT = "/reports"


def app_environment(settings: Settings, node: int = 1) -> dict[str, str]:
    """The test environment: LAYERKEEP_TEST_ENV templates filled from the service facts.

    Test node ``node`` of a run on one machine gets redis database ``node - 1`` (its
    database on postgres is the settings' LAYERKEEP_DB_NAME, see testrun.nodes).
    """
    facts = service_facts(settings)
    for spec in settings.services:
        if spec.kind == "redis" and node > 1:
            url = facts[spec.name]["url"]
            facts[spec.name]["url"] = f"{url.rpartition('/')[0]}/{node - 1}"
    return {name: render_template(value, facts) for name, value in settings.test_env.items()}


def run_in_app_image(
    engine: Engine,
    settings: Settings,
    script: str,
    *,
    purpose: str,
    mounts: Sequence[Mount] = (),
    log: Log = print,
    node: int = 1,
) -> int:
    """Run ``script`` with ``sh -c`` in the app image; return its exit code.

    The container joins the job's network, gets the test environment, and is removed
    afterwards whatever happens. Secrets are masked in the streamed output. ``node`` is
    the test node of a run on one machine whose environment it gets.
    """
    job = engine.job_for(settings)
    container = create_app_container(
        engine, settings, script, purpose=purpose, mounts=mounts, node=node
    )
    try:
        engine.start_container(container)
        for line in engine.follow_output(container):
            log(job.mask(line))
        return engine.wait_container(container)
    finally:
        engine.remove_container(container)


def create_app_container(
    engine: Engine,
    settings: Settings,
    script: str,
    *,
    purpose: str,
    mounts: Sequence[Mount] = (),
    node: int = 1,
) -> str:
    """Create (not start) the container that runs ``script`` in the app image; its id.

    ``node`` is the test node of a run on one machine whose environment it gets.
    """
    job = engine.job_for(settings)
    image = str(settings.require_image())
    if engine.image_id(image) is None:
        raise ConfigError(
            f"the app image {image} is not in the engine", hint="run `inv image.build` first"
        )
    for mount in mounts:
        if not mount.source.exists():
            raise ConfigError(
                f"mount source {mount.source} does not exist",
                key="LAYERKEEP_TEST_MOUNTS",
                hint="paths are relative to the project folder",
            )
    name = f"{job.container_name(purpose)}-{os.urandom(3).hex()}"
    # The job's network when its services run, else Docker's default bridge.
    network = job.network if engine.find_network(job.network) else "bridge"
    return engine.create_container(
        image,
        name=name,
        network=network,
        entrypoint=["sh", "-c"],
        command=[script],
        environment=app_environment(settings, node),
        mounts=[(str(m.source), m.target, m.read_only) for m in mounts],
        working_dir=settings.test_workdir or None,
        labels={"io.layerkeep.purpose": purpose},
    )


def mounts_for(settings: Settings, *extra: Mount) -> list[Mount]:
    """The configured test mounts plus ``extra``."""
    return [*settings.test_mounts, *extra]
