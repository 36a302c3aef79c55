"""Run a shell script inside the app image on the job's network, output streamed live."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import docker.errors

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError
from layerkeep.core.settings import Mount, Settings, render_template
from layerkeep.services.containers import (
    container_name,
    job_network,
    redact,
    secrets,
    service_facts,
)

Log = Callable[[str], None]
REPORTS_MOUNT = "/reports"


def app_environment(settings: Settings) -> dict[str, str]:
    """The test environment: LAYERKEEP_TEST_ENV templates filled from the service facts."""
    facts = service_facts(settings)
    return {name: render_template(value, facts) for name, value in settings.test_env.items()}


def run_in_app_image(
    engine: Engine,
    settings: Settings,
    script: str,
    *,
    purpose: str,
    mounts: Sequence[Mount] = (),
    log: Log = print,
) -> int:
    """Run ``script`` with ``sh -c`` in the app image; return its exit code.

    The container joins the job's network, gets the test environment, and is removed
    afterwards whatever happens. Secrets are masked in the streamed output.
    """
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
    name = f"{container_name(settings, purpose)}-{os.urandom(3).hex()}"
    container = engine.create_container(
        image,
        name=name,
        network=_network(engine, settings),
        entrypoint=["sh", "-c"],
        command=[script],
        environment=app_environment(settings),
        mounts=[(str(m.source), m.target, m.read_only) for m in mounts],
        working_dir=settings.test_workdir or None,
        labels={"io.layerkeep.purpose": purpose},
    )
    hidden = secrets(settings)
    try:
        engine.api.start(container)
        for line in _lines(engine.api.logs(container, stream=True, follow=True)):
            log(redact(line, hidden))
        status = engine.api.wait(container)
        return int(status.get("StatusCode", 1))
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            engine.api.remove_container(container, force=True, v=True)


def _network(engine: Engine, settings: Settings) -> str:
    """The job's network when its services run, else Docker's default bridge."""
    name = job_network(settings)
    return name if engine.api.networks(names=[name]) else "bridge"


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace")
    if pending:
        yield pending.decode(errors="replace")


def mounts_for(settings: Settings, *extra: Mount) -> list[Mount]:
    """The configured test mounts plus ``extra``."""
    return [*settings.test_mounts, *extra]
