"""Service containers of one CI job: start them on the job's network, wait, remove, sweep.

Every container and the network carry the job's labels (the engine stamps them) and
containers also ``io.layerkeep.service=<name>``, so ``services_down`` and ``sweep`` find
them by label even after a killed run. Names come from the job (project and build id),
so two jobs on one engine never share a container or a network. Readiness is awaited
with :mod:`layerkeep.services.readiness`; the job's secrets are masked in whatever is
printed or raised.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.imageref import parse_image_ref
from layerkeep.core.job import BUILD_ID_LABEL, PROJECT_LABEL, Job
from layerkeep.core.log import Log
from layerkeep.core.progress import MeterFactory, silent
from layerkeep.core.registry import pull_tag
from layerkeep.core.registry_credentials import credentials_for, registry_host
from layerkeep.core.registry_failures import OFFLINE_HINT, Retries, unreachable_registry
from layerkeep.core.service_specs import ServiceSpec, service_key
from layerkeep.core.settings import Settings
from layerkeep.services.readiness import ServiceWait, wait_ready

SERVICE_LABEL = "io.layerkeep.service"
# A digest of what the container was created from: a changed image, env, command or
# port makes a second `up` replace the container instead of reusing a stale one.
CONFIG_LABEL = "io.layerkeep.service.config"


@dataclass(frozen=True)
class RunningService:
    """A service container that answered its readiness check."""

    spec: ServiceSpec
    container: str
    container_id: str
    reused: bool
    ready_after: float
    awaited: str

    @property
    def name(self) -> str:
        """The service's name, which is also its host name on the job network."""
        return self.spec.name


# --- names and facts -------------------------------------------------------------------


def _postgres_credentials(settings: Settings, spec: ServiceSpec) -> tuple[str, str]:
    # The spec's env is what the container gets (db_user/db_password unless overridden).
    user = spec.env.get("POSTGRES_USER") or settings.db_user
    return user, spec.env.get("POSTGRES_PASSWORD", settings.db_password)


def service_facts(settings: Settings) -> dict[str, dict[str, str]]:
    """``{service: {host, port, user, password, database, url}}`` as seen on the job network."""
    facts: dict[str, dict[str, str]] = {}
    for spec in settings.services:
        host = spec.name  # the network alias
        port = str(spec.container_port) if spec.container_port else ""
        user = password = database = url = ""
        where = f"{host}:{port}" if port else host
        if spec.kind == "postgres":
            user, password = _postgres_credentials(settings, spec)
            if spec.name == settings.db_service:
                database = settings.db_name
            else:
                database = spec.env.get("POSTGRES_DB") or user
            login = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
            url = f"postgresql://{login}@{where}/{quote(database, safe='')}"
        elif spec.kind == "redis":
            url = f"redis://{where}/0"
        facts[spec.name] = {
            "host": host,
            "port": port,
            "user": user,
            "password": password,
            "database": database,
            "url": url,
        }
    return facts


def container_env(settings: Settings, spec: ServiceSpec) -> dict[str, str]:
    """The container's environment: the spec's, plus POSTGRES_DB for the database service.

    The official image creates POSTGRES_DB at init, so the database URL works as soon as
    the service is ready (db.init's "create if missing" then finds it).
    """
    env = dict(spec.env)
    if spec.kind == "postgres" and spec.name == settings.db_service:
        env.setdefault("POSTGRES_DB", settings.db_name)
    return env


# --- images ------------------------------------------------------------------------------


def ensure_image(
    engine: Engine, settings: Settings, image: str, *, log: Log, progress: MeterFactory = silent
) -> str:
    """The id of ``image``: present in the engine, or pulled; else a one-line error.

    Pulls go through the registry module: transient failures are retried, and the
    configured credentials are used when the image lives on LAYERKEEP_REGISTRY.
    """
    found = engine.image_id(image)
    if found is not None:
        return found
    log(f"{image}: not in the engine, pulling")
    ref = parse_image_ref(image)
    reason = "not a valid image reference"
    if ref is not None:
        credentials = credentials_for(settings, registry_host(ref.repository))
        try:
            pull_tag(engine, ref, credentials, Retries.of(settings, log), progress=progress)
            reason = "the engine reports success but has no such image"
        except DockerOperationError as error:
            reason = error.message
    found = engine.image_id(image)
    if found is not None:
        return found
    offline = unreachable_registry(reason)
    if offline:
        raise DockerOperationError(
            f"cannot pull {image} ({offline})", image=image, hint=OFFLINE_HINT
        )
    raise DockerOperationError(
        f"image {image} is not in the engine, not restored by cache.load (add it to "
        f"LAYERKEEP_CACHE_IMAGES), pull failed: {reason.strip().splitlines()[0]}",
        image=image,
        hint="check the name, or run cache.load on a machine that has it",
    )


# --- up and down -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Started:
    spec: ServiceSpec
    name: str
    container_id: str
    reused: bool
    started: float


def _config_digest(spec: ServiceSpec, image_id: str, env: Mapping[str, str], network: str) -> str:
    record = {
        "image": image_id,
        "env": dict(sorted(env.items())),
        "command": spec.command,
        "ports": [spec.container_port, spec.host_port],
        "network": network,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _check_owner(labels: Mapping[str, str] | None, job: Job, what: str) -> None:
    labels = labels or {}
    if not job.owns(labels):
        raise DockerOperationError(
            f"{what} belongs to another job (project {labels.get(PROJECT_LABEL)!r}, "
            f"build {labels.get(BUILD_ID_LABEL)!r})",
            hint="remove it, or set another LAYERKEEP_BUILD_ID",
        )


def _start(
    engine: Engine, job: Job, settings: Settings, spec: ServiceSpec, *, image_id: str,
    log: Log,
) -> _Started:
    name = job.container_name(spec.name)
    env = container_env(settings, spec)
    digest = _config_digest(spec, image_id, env, job.network)
    existing = engine.inspect_container(name)
    if existing is not None:
        labels = existing["Config"].get("Labels") or {}
        _check_owner(labels, job, f"container {name}")
        status = existing["State"].get("Status")
        if existing["State"].get("Running") and labels.get(CONFIG_LABEL) == digest:
            log(f"{spec.name}: reusing running {name}")
            return _Started(spec, name, str(existing["Id"]), True, time.monotonic())
        why = "its settings changed" if existing["State"].get("Running") else f"it is {status}"
        log(f"{spec.name}: replacing {name} ({why})")
        engine.remove_container(str(existing["Id"]))
    ports = {spec.container_port: spec.host_port} if spec.host_port and spec.container_port else {}
    container_id = engine.create_container(
        spec.image,
        name=name,
        network=job.network,
        aliases=[spec.name],
        command=shlex.split(spec.command) if spec.command else None,
        environment=env,
        labels={SERVICE_LABEL: spec.name, CONFIG_LABEL: digest},
        ports=ports,
    )
    published = f", on 127.0.0.1:{spec.host_port}" if ports else ""
    log(f"{spec.name}: starting {name} from {spec.image}{published}")
    try:
        engine.start_container(name)
    except DockerOperationError as error:
        raise DockerOperationError(
            job.mask(f"service {spec.name}: {error.message}"),
            image=spec.image,
            hint=f"check {service_key(spec.name, 'COMMAND')}, "
            f"{service_key(spec.name, 'PORT')} and the image",
        ) from None
    return _Started(spec, name, container_id, False, time.monotonic())


def services_up(
    engine: Engine, settings: Settings, *, log: Log, progress: MeterFactory = silent
) -> list[RunningService]:
    """Start the job's services on its network and wait until each is ready.

    Idempotent: running containers of this job with unchanged settings are reused; an
    exited or outdated one is replaced. All are started before the first wait, so they
    boot side by side; each one's timeout counts from its own start.
    """
    # Every image first: a missing one fails before anything is created.
    job = engine.job_for(settings)
    images = [
        ensure_image(engine, settings, spec.image, log=log, progress=progress)
        for spec in settings.services
    ]
    network_id = engine.ensure_network(job.network)
    network = engine.inspect_network(network_id) or {}
    _check_owner(network.get("Labels"), job, f"network {job.network}")
    started = [
        _start(engine, job, settings, spec, image_id=image_id, log=log)
        for spec, image_id in zip(settings.services, images, strict=True)
    ]
    waits = [
        ServiceWait(engine, job, item.spec, item.container_id, started=item.started, log=log)
        for item in started
    ]
    wait_ready(waits)
    running: list[RunningService] = []
    for item, wait in zip(started, waits, strict=True):
        assert wait.strategy is not None
        assert wait.ready_after is not None
        running.append(
            RunningService(
                spec=item.spec,
                container=item.name,
                container_id=item.container_id,
                reused=item.reused,
                ready_after=wait.ready_after,
                awaited=wait.strategy.describe(),
            )
        )
    return running


def services_down(engine: Engine, settings: Settings, *, log: Log) -> int:
    """Remove this job's containers (with anonymous volumes) and network; how many went."""
    job = engine.job_for(settings)
    removed = 0
    for container in engine.list_containers(job.label_filter):
        name = str(container["Names"][0]).lstrip("/") if container.get("Names") else ""
        if engine.remove_container(str(container["Id"])):
            log(f"removed container {name or container['Id'][:12]}")
            removed += 1
    for network in engine.list_networks(job.label_filter):
        if engine.remove_network(str(network["Name"])):
            log(f"removed network {network['Name']}")
            removed += 1
    if not removed:
        log(f"nothing to remove for {job.network}")
    return removed


def _network_created(network: Mapping[str, Any]) -> float:
    # RFC 3339 with nanoseconds; fromisoformat (3.11) takes the Z and the long fraction.
    return datetime.fromisoformat(str(network["Created"])).timestamp()


def sweep(
    engine: Engine,
    *,
    older_than: float,
    log: Log,
    now: float | None = None,
    project: str | None = None,
) -> int:
    """Remove layerkeep containers, then networks, created more than ``older_than`` s ago.

    Only what carries the project label (of ``project`` when given): leftovers of
    killed jobs. Returns how many things were removed.
    """
    current = time.time() if now is None else now
    label = PROJECT_LABEL if project is None else f"{PROJECT_LABEL}={project}"
    removed = 0
    for container in engine.list_containers([label]):
        age = current - float(container["Created"])
        if age <= older_than:
            continue
        name = str(container["Names"][0]).lstrip("/") if container.get("Names") else ""
        if engine.remove_container(str(container["Id"])):
            log(f"swept container {name or container['Id'][:12]} ({age:.0f} s old)")
            removed += 1
    for network in engine.list_networks([label]):
        age = current - _network_created(network)
        if age <= older_than:
            continue
        try:
            gone = engine.remove_network(str(network["Name"]))
        except DockerOperationError as error:
            # A younger container of another job may still use it: leave it for later.
            log(f"warning: kept network {network['Name']}: {error.message}")
            continue
        if gone:
            log(f"swept network {network['Name']} ({age:.0f} s old)")
            removed += 1
    log(f"sweep removed {removed} leftover(s) older than {older_than:g} s")
    return removed
