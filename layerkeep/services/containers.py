"""Service containers of one CI job: start them on the job's network, wait, remove, sweep.

Every container and the network carry the project and build-id labels (from the engine)
and containers also ``io.layerkeep.service=<name>``, so ``services_down`` and ``sweep``
find them by label even after a killed run. Names derive from project and build id, so
two jobs on one engine never share a container or a network.

Readiness is a strategy per service (:class:`ExecCheck`, :class:`HealthCheck`,
:class:`RunningCheck`), polled with an explicit timeout; a container that exits or turns
unhealthy fails at once. The database password (and every other password fact) is
redacted from whatever is printed or raised.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn, Protocol
from urllib.parse import quote

import docker.errors

from layerkeep.core.engine import BUILD_ID_LABEL, PROJECT_LABEL, Engine
from layerkeep.core.errors import DockerOperationError, LayerkeepError
from layerkeep.core.imageref import parse_image_ref
from layerkeep.core.registry import credentials_for, pull_tag, registry_host
from layerkeep.core.service_specs import ServiceSpec, service_key
from layerkeep.core.settings import Settings

Log = Callable[[str], None]
SERVICE_LABEL = "io.layerkeep.service"
# A digest of what the container was created from: a changed image, env, command or
# port makes a second `up` replace the container instead of reusing a stale one.
CONFIG_LABEL = "io.layerkeep.service.config"
POLL_INTERVAL = 0.25
LOG_LINES = 15
_EXEC_SETTLE = 0.2
RUNNING_SETTLE = 0.5
_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]")
_MAX_PART = 60
_SECRET_ENV = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)
REDACTED = "******"


class ServiceNotReady(LayerkeepError):
    """A service container exited, turned unhealthy or did not get ready in time."""

    def __init__(
        self,
        message: str,
        *,
        service: str,
        state: str,
        last_lines: list[str],
        exit_code: int | None = None,
        hint: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.service = service
        self.state = state
        self.container_exit_code = exit_code  # when it stopped; None otherwise
        # Already redacted; printed by services_up, never part of one_line().
        self.last_lines = last_lines


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


def _slug(text: str) -> str:
    """``text`` within Docker's name alphabet; altered text gets a hash so slugs stay apart."""
    slug = _UNSAFE.sub("-", text)[:_MAX_PART]
    if slug == text:
        return slug
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest


def job_network(settings: Settings) -> str:
    """The job's network: ``layerkeep-<project>-<build id>``, sanitised for Docker."""
    return f"layerkeep-{_slug(settings.project)}-{_slug(settings.build_id)}"


def container_name(settings: Settings, service: str) -> str:
    """The container named ``service`` (a service's name) in this job: ``<network>-<service>``."""
    return f"{job_network(settings)}-{_slug(service)}"


def job_filters(settings: Settings) -> dict[str, list[str]]:
    """The engine filter selecting everything this job created."""
    return {
        "label": [f"{PROJECT_LABEL}={settings.project}", f"{BUILD_ID_LABEL}={settings.build_id}"]
    }


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


def secrets(settings: Settings) -> tuple[str, ...]:
    """Values never to print: the DB password, password facts, secret-looking env values."""
    found = {settings.db_password}
    found.update(facts["password"] for facts in service_facts(settings).values())
    for spec in settings.services:
        found.update(value for key, value in spec.env.items() if _SECRET_ENV.search(key))
    quoted = {quote(value, safe="") for value in found}
    # Longest first, so a secret containing another is hidden whole.
    return tuple(sorted((found | quoted) - {""}, key=len, reverse=True))


def redact(text: str, hidden: Iterable[str]) -> str:
    """``text`` with every value in ``hidden`` replaced."""
    for value in hidden:
        text = text.replace(value, REDACTED)
    return text


# --- images ------------------------------------------------------------------------------


def ensure_image(engine: Engine, settings: Settings, image: str, *, log: Log) -> str:
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
            pull_tag(engine, ref, credentials, attempts=settings.push_retries, log=log)
            reason = "the engine reports success but has no such image"
        except DockerOperationError as error:
            reason = error.message
    found = engine.image_id(image)
    if found is not None:
        return found
    raise DockerOperationError(
        f"image {image} is not in the engine, not restored by cache.load (add it to "
        f"LAYERKEEP_CACHE_IMAGES), pull failed: {reason.strip().splitlines()[0]}",
        image=image,
        hint="check the name, or run cache.load on a machine that has it",
    )


# --- readiness -----------------------------------------------------------------------------


class Readiness(Protocol):
    """One way of telling that a running service is ready."""

    def describe(self) -> str:
        """What is awaited, for messages."""
        ...

    def check(self, engine: Engine, container_id: str, state: Mapping[str, Any]) -> bool:
        """Whether the container is ready now; ``state`` is its fresh State record."""
        ...


class ExecCheck:
    """Ready when ``sh -c <command>`` exits 0 inside the container.

    The command runs detached and is polled, so one that hangs cannot hold the wait
    past the service's timeout.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.last_exit: int | None = None
        self._exec_id: str | None = None

    def describe(self) -> str:
        return f"`{self.command}` to exit 0"

    def check(self, engine: Engine, container_id: str, state: Mapping[str, Any]) -> bool:
        if self._exec_id is None:
            created = engine.api.exec_create(container_id, ["sh", "-c", self.command])
            self._exec_id = str(created["Id"])
            engine.api.exec_start(self._exec_id, detach=True)
        # Most checks finish in milliseconds: look again briefly before a full round.
        settle = time.monotonic() + _EXEC_SETTLE
        info = engine.api.exec_inspect(self._exec_id)
        while info.get("Running") and time.monotonic() < settle:
            time.sleep(_EXEC_SETTLE / 10)
            info = engine.api.exec_inspect(self._exec_id)
        if info.get("Running"):
            return False
        self._exec_id = None
        self.last_exit = info.get("ExitCode")
        return self.last_exit == 0

    def progress(self) -> str:
        """How the last finished check went."""
        if self.last_exit is not None:
            return f"it last exited {self.last_exit}"
        return "it had not finished yet" if self._exec_id is not None else ""


class HealthCheck:
    """Ready when the image's HEALTHCHECK reports healthy."""

    def describe(self) -> str:
        return "the image's health check to report healthy"

    def check(self, engine: Engine, container_id: str, state: Mapping[str, Any]) -> bool:
        return bool(state.get("Health", {}).get("Status") == "healthy")


class RunningCheck:
    """Ready once running for ``settle`` seconds: for images with no other way to tell.

    Without the settle time a command that fails at once could be seen running and
    called ready a moment before it exits.
    """

    def __init__(self, settle: float = RUNNING_SETTLE) -> None:
        self.settle = settle
        self._first_seen: float | None = None

    def describe(self) -> str:
        return f"the container to keep running for {self.settle:g} s"

    def check(self, engine: Engine, container_id: str, state: Mapping[str, Any]) -> bool:
        if not state.get("Running"):
            self._first_seen = None
            return False
        if self._first_seen is None:
            self._first_seen = time.monotonic()
        return time.monotonic() - self._first_seen >= self.settle


def readiness_for(spec: ServiceSpec, state: Mapping[str, Any]) -> Readiness:
    """The spec's ready command, else the image's health check, else just running."""
    if spec.ready:
        return ExecCheck(spec.ready)
    if state.get("Health"):
        return HealthCheck()
    return RunningCheck()


def _describe_state(state: Mapping[str, Any]) -> str:
    status = str(state.get("Status", "unknown"))
    if status in ("exited", "dead"):
        status += f" (exit code {state.get('ExitCode')})"
        if state.get("OOMKilled"):
            status += ", killed: out of memory"
    health = state.get("Health")
    if health:
        status += f", {health.get('Status')}"
    return status


def last_log_lines(engine: Engine, container_id: str, hidden: Iterable[str]) -> list[str]:
    """The container's last LOG_LINES lines of output, redacted."""
    try:
        raw = engine.api.logs(container_id, stdout=True, stderr=True, tail=LOG_LINES)
    except docker.errors.NotFound:
        return []
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    lines = list(hidden)
    return [redact(line.rstrip(), lines) for line in text.splitlines() if line.strip()]


class ServiceWait:
    """One service's wait, polled a round at a time so services are awaited side by side.

    Its timeout counts from ``started`` (when its container was started).
    """

    def __init__(
        self,
        engine: Engine,
        spec: ServiceSpec,
        container_id: str,
        *,
        started: float,
        hidden: tuple[str, ...],
        log: Log,
    ) -> None:
        self.engine = engine
        self.spec = spec
        self.container_id = container_id
        self.deadline = started + spec.timeout
        self.started = started
        self.hidden = hidden
        self.log = log
        self.strategy: Readiness | None = None
        self.ready_after: float | None = None

    def poll(self) -> bool:
        """One round: True once ready; ServiceNotReady when stopped, unhealthy or late."""
        spec = self.spec
        try:
            state = self.engine.api.inspect_container(self.container_id)["State"]
        except docker.errors.NotFound:
            raise ServiceNotReady(
                f"service {spec.name}: its container was removed while waiting",
                service=spec.name,
                state="removed",
                last_lines=[],
                hint="something else removed it (a sweep, or services.down)",
            ) from None
        if self.strategy is None:
            self.strategy = readiness_for(spec, state)
        if not state.get("Running"):
            self._fail(state, why="stopped")
        if state.get("Health", {}).get("Status") == "unhealthy":
            self._fail(state, why="unhealthy")
        try:
            if self.strategy.check(self.engine, self.container_id, state):
                self.ready_after = time.monotonic() - self.started
                self.log(f"{spec.name}: ready after {self.ready_after:.1f} s "
                         f"({self.strategy.describe()})")
                return True
        except docker.errors.APIError as error:
            # 409: the container stopped between inspect and exec; the next round says so.
            if error.status_code != 409:
                raise DockerOperationError(
                    redact(f"service {spec.name}: cannot run its ready check: "
                           f"{error.explanation or error}", self.hidden),
                    image=spec.image,
                    hint="the ready command runs with sh -c inside the container; "
                    f"set {service_key(spec.name, 'READY')}",
                ) from None
        if time.monotonic() >= self.deadline:
            self._fail(state, why="timeout")
        return False

    def _fail(self, state: Mapping[str, Any], *, why: str) -> NoReturn:
        assert self.strategy is not None
        _fail(self.engine, self.spec, self.container_id, state=state, strategy=self.strategy,
              hidden=self.hidden, log=self.log, why=why)


def wait_ready(waits: Iterable[ServiceWait], *, interval: float = POLL_INTERVAL) -> None:
    """Poll every wait each round until all are ready; the first failure is raised."""
    pending = list(waits)
    while pending:
        pending = [wait for wait in pending if not wait.poll()]
        if pending:
            time.sleep(interval)


def _fail(
    engine: Engine,
    spec: ServiceSpec,
    container_id: str,
    *,
    state: Mapping[str, Any],
    strategy: Readiness,
    hidden: tuple[str, ...],
    log: Log,
    why: str,
) -> NoReturn:
    lines = last_log_lines(engine, container_id, hidden)
    awaited = strategy.describe()
    described = _describe_state(state)
    exit_code: int | None = None
    if why == "timeout":
        progress = strategy.progress() if isinstance(strategy, ExecCheck) else ""
        message = (
            f"service {spec.name} not ready after {spec.timeout:g} s: awaited {awaited}"
            f"{f' ({progress})' if progress else ''}; container is {described}"
        )
        hint = (
            f"raise {service_key(spec.name, 'TIMEOUT')}, or check the image and "
            f"{service_key(spec.name, 'READY')}"
        )
    elif why == "unhealthy":
        message = f"service {spec.name} turned unhealthy while awaiting {awaited}"
        health_log = state.get("Health", {}).get("Log") or [{}]
        output = str(health_log[-1].get("Output", "")).strip()
        lines += [f"health check: {line}" for line in redact(output, hidden).splitlines()]
        hint = "check the image's HEALTHCHECK and the log lines above"
    else:
        exit_code = int(state.get("ExitCode") or 0)
        message = (
            f"service {spec.name} stopped before it was ready: container is {described}"
            f"{', ' + str(state['Error']) if state.get('Error') else ''}"
        )
        hint = (
            f"see its log lines above; check {service_key(spec.name, 'COMMAND')}, "
            f"{service_key(spec.name, 'ENV')} and the image"
        )
    name = _name_of(engine, container_id)
    log(f"{spec.name}: last {len(lines)} log lines of {name}:" if lines
        else f"{spec.name}: {name} printed nothing")
    for line in lines:
        log(f"  | {line}")
    raise ServiceNotReady(
        redact(message, hidden),
        service=spec.name,
        state=described,
        last_lines=lines,
        exit_code=exit_code,
        hint=hint,
    )


def _name_of(engine: Engine, container_id: str) -> str:
    try:
        return str(engine.api.inspect_container(container_id)["Name"]).lstrip("/")
    except docker.errors.NotFound:
        return container_id[:12]


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


def _inspect(engine: Engine, name: str) -> dict[str, Any] | None:
    try:
        return dict(engine.api.inspect_container(name))
    except docker.errors.NotFound:
        return None


def _check_owner(labels: Mapping[str, str] | None, settings: Settings, what: str) -> None:
    labels = labels or {}
    if (labels.get(PROJECT_LABEL), labels.get(BUILD_ID_LABEL)) != (
        settings.project,
        settings.build_id,
    ):
        raise DockerOperationError(
            f"{what} belongs to another job (project {labels.get(PROJECT_LABEL)!r}, "
            f"build {labels.get(BUILD_ID_LABEL)!r})",
            hint="remove it, or set another LAYERKEEP_BUILD_ID",
        )


def _start(
    engine: Engine, settings: Settings, spec: ServiceSpec, *, image_id: str, network: str,
    log: Log,
) -> _Started:
    name = container_name(settings, spec.name)
    env = container_env(settings, spec)
    digest = _config_digest(spec, image_id, env, network)
    existing = _inspect(engine, name)
    if existing is not None:
        labels = existing["Config"].get("Labels") or {}
        _check_owner(labels, settings, f"container {name}")
        status = existing["State"].get("Status")
        if existing["State"].get("Running") and labels.get(CONFIG_LABEL) == digest:
            log(f"{spec.name}: reusing running {name}")
            return _Started(spec, name, str(existing["Id"]), True, time.monotonic())
        why = "its settings changed" if existing["State"].get("Running") else f"it is {status}"
        log(f"{spec.name}: replacing {name} ({why})")
        _remove_container(engine, str(existing["Id"]))
    ports = {spec.container_port: spec.host_port} if spec.host_port and spec.container_port else {}
    container_id = engine.create_container(
        spec.image,
        name=name,
        network=network,
        aliases=[spec.name],
        command=shlex.split(spec.command) if spec.command else None,
        environment=env,
        labels={SERVICE_LABEL: spec.name, CONFIG_LABEL: digest},
        ports=ports,
    )
    published = f", on 127.0.0.1:{spec.host_port}" if ports else ""
    log(f"{spec.name}: starting {name} from {spec.image}{published}")
    try:
        engine.api.start(container_id)
    except docker.errors.APIError as error:
        raise DockerOperationError(
            redact(f"service {spec.name}: cannot start {name}: {error.explanation or error}",
                   secrets(settings)),
            image=spec.image,
            hint=f"check {service_key(spec.name, 'COMMAND')}, "
            f"{service_key(spec.name, 'PORT')} and the image",
        ) from None
    return _Started(spec, name, container_id, False, time.monotonic())


def services_up(engine: Engine, settings: Settings, *, log: Log) -> list[RunningService]:
    """Start the job's services on its network and wait until each is ready.

    Idempotent: running containers of this job with unchanged settings are reused; an
    exited or outdated one is replaced. All are started before the first wait, so they
    boot side by side; each one's timeout counts from its own start.
    """
    # Every image first: a missing one fails before anything is created.
    images = [ensure_image(engine, settings, spec.image, log=log) for spec in settings.services]
    network = job_network(settings)
    network_id = engine.ensure_network(network)
    _check_owner(engine.api.inspect_network(network_id).get("Labels"), settings,
                 f"network {network}")
    hidden = secrets(settings)
    started = [
        _start(engine, settings, spec, image_id=image_id, network=network, log=log)
        for spec, image_id in zip(settings.services, images, strict=True)
    ]
    waits = [
        ServiceWait(engine, item.spec, item.container_id, started=item.started, hidden=hidden,
                    log=log)
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


def _remove_container(engine: Engine, container_id: str) -> bool:
    try:
        engine.api.remove_container(container_id, force=True, v=True)
    except docker.errors.NotFound:
        return False  # gone already: another down or sweep got there first
    except docker.errors.APIError as error:
        # 409 "removal already in progress": someone else is removing it.
        if error.status_code != 409:
            raise
        return False
    return True


def _remove_network(engine: Engine, network_id: str, name: str) -> bool:
    try:
        engine.api.remove_network(network_id)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as error:
        raise DockerOperationError(
            f"cannot remove network {name}: {error.explanation or error}",
            hint=f"disconnect what still uses it (docker network inspect {name})",
        ) from None
    return True


def services_down(engine: Engine, settings: Settings, *, log: Log) -> int:
    """Remove this job's containers (with anonymous volumes) and network; how many went."""
    filters = job_filters(settings)
    removed = 0
    for container in engine.api.containers(all=True, filters=filters):
        name = str(container["Names"][0]).lstrip("/") if container.get("Names") else ""
        if _remove_container(engine, str(container["Id"])):
            log(f"removed container {name or container['Id'][:12]}")
            removed += 1
    for network in engine.api.networks(filters=filters):
        if _remove_network(engine, str(network["Id"]), str(network["Name"])):
            log(f"removed network {network['Name']}")
            removed += 1
    if not removed:
        log(f"nothing to remove for {job_network(settings)}")
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
    filters = {"label": [label]}
    removed = 0
    for container in engine.api.containers(all=True, filters=filters):
        age = current - float(container["Created"])
        if age <= older_than:
            continue
        name = str(container["Names"][0]).lstrip("/") if container.get("Names") else ""
        if _remove_container(engine, str(container["Id"])):
            log(f"swept container {name or container['Id'][:12]} ({age:.0f} s old)")
            removed += 1
    for network in engine.api.networks(filters=filters):
        age = current - _network_created(network)
        if age <= older_than:
            continue
        try:
            gone = _remove_network(engine, str(network["Id"]), str(network["Name"]))
        except DockerOperationError as error:
            # A younger container of another job may still use it: leave it for later.
            log(f"warning: kept network {network['Name']}: {error.message}")
            continue
        if gone:
            log(f"swept network {network['Name']} ({age:.0f} s old)")
            removed += 1
    log(f"sweep removed {removed} leftover(s) older than {older_than:g} s")
    return removed
