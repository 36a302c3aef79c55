"""Readiness of service containers: one strategy per service, polled side by side.

A strategy (:class:`ExecCheck`, :class:`HealthCheck`, :class:`RunningCheck`) tells
whether a running container is ready; :class:`ServiceWait` polls one with an explicit
timeout and fails at once when the container exits or turns unhealthy, saying what was
awaited, the container's state and its last log lines (masked with the job's secrets).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn, Protocol

from layerkeep.core.engine import Engine, RunningExec
from layerkeep.core.errors import (
    DockerOperationError,
    LayerkeepError,
    ResourceConflict,
    ResourceNotFound,
)
from layerkeep.core.job import Job
from layerkeep.core.log import Log
from layerkeep.core.service_specs import ServiceSpec, service_key

POLL_INTERVAL = 0.25
LOG_LINES = 15
_EXEC_SETTLE = 0.2
RUNNING_SETTLE = 0.5


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
        # Already masked; printed by services_up, never part of one_line().
        self.last_lines = last_lines


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

    One check runs at a time and is only waited for briefly each round, so one that
    hangs cannot hold the wait past the service's timeout.
    """

    def __init__(self, command: str) -> None:
        self.command = command
        self.last_exit: int | None = None
        self._running: RunningExec | None = None

    def describe(self) -> str:
        return f"`{self.command}` to exit 0"

    def check(self, engine: Engine, container_id: str, state: Mapping[str, Any]) -> bool:
        if self._running is None:
            self._running = engine.start_exec(container_id, ["sh", "-c", self.command])
        # Most checks finish in milliseconds: wait that long before a full round.
        result = self._running.result(_EXEC_SETTLE)
        if result is None:
            return False
        self._running = None
        self.last_exit = result.exit_code
        return result.exit_code == 0

    def progress(self) -> str:
        """How the last finished check went."""
        if self.last_exit is not None:
            return f"it last exited {self.last_exit}"
        return "it had not finished yet" if self._running is not None else ""


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


def last_log_lines(engine: Engine, container_id: str, job: Job) -> list[str]:
    """The container's last LOG_LINES lines of output, masked; none once it is gone."""
    try:
        text = engine.container_output(container_id, tail=LOG_LINES)
    except ResourceNotFound:
        return []
    return [job.mask(line.rstrip()) for line in text.splitlines() if line.strip()]


class ServiceWait:
    """One service's wait, polled a round at a time so services are awaited side by side.

    Its timeout counts from ``started`` (when its container was started).
    """

    def __init__(
        self,
        engine: Engine,
        job: Job,
        spec: ServiceSpec,
        container_id: str,
        *,
        started: float,
        log: Log,
    ) -> None:
        self.engine = engine
        self.job = job
        self.spec = spec
        self.container_id = container_id
        self.deadline = started + spec.timeout
        self.started = started
        self.log = log
        self.strategy: Readiness | None = None
        self.ready_after: float | None = None

    def poll(self) -> bool:
        """One round: True once ready; ServiceNotReady when stopped, unhealthy or late."""
        spec = self.spec
        attrs = self.engine.inspect_container(self.container_id)
        if attrs is None:
            raise ServiceNotReady(
                f"service {spec.name}: its container was removed while waiting",
                service=spec.name,
                state="removed",
                last_lines=[],
                hint="something else removed it (a sweep, or services.down)",
            )
        state = attrs["State"]
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
        except ResourceConflict:
            pass  # it stopped between inspect and exec: the next round says so
        except DockerOperationError as error:
            raise DockerOperationError(
                self.job.mask(f"service {spec.name}: cannot run its ready check: "
                              f"{error.message}"),
                image=spec.image,
                hint="the ready command runs with sh -c inside the container; "
                f"set {service_key(spec.name, 'READY')}",
            ) from None
        if time.monotonic() >= self.deadline:
            self._fail(state, why="timeout")
        return False

    def _fail(self, state: Mapping[str, Any], *, why: str) -> NoReturn:
        assert self.strategy is not None
        _fail(self.engine, self.job, self.spec, self.container_id, state=state,
              strategy=self.strategy, log=self.log, why=why)


def wait_ready(waits: Iterable[ServiceWait], *, interval: float = POLL_INTERVAL) -> None:
    """Poll every wait each round until all are ready; the first failure is raised."""
    pending = list(waits)
    while pending:
        pending = [wait for wait in pending if not wait.poll()]
        if pending:
            time.sleep(interval)


def _fail(
    engine: Engine,
    job: Job,
    spec: ServiceSpec,
    container_id: str,
    *,
    state: Mapping[str, Any],
    strategy: Readiness,
    log: Log,
    why: str,
) -> NoReturn:
    lines = last_log_lines(engine, container_id, job)
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
        lines += [f"health check: {line}" for line in job.mask(output).splitlines()]
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
    attrs = engine.inspect_container(container_id)
    name = str(attrs["Name"]).lstrip("/") if attrs else container_id[:12]
    log(f"{spec.name}: last {len(lines)} log lines of {name}:" if lines
        else f"{spec.name}: {name} printed nothing")
    for line in lines:
        log(f"  | {line}")
    raise ServiceNotReady(
        job.mask(message),
        service=spec.name,
        state=described,
        last_lines=lines,
        exit_code=exit_code,
        hint=hint,
    )
