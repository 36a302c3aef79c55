"""The engine's containers: create them labelled, start, wait, read their output, and
run commands in them (:meth:`ContainerCalls.start_exec`, the one way)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import docker

from layerkeep.core.engine.connection import Connection
from layerkeep.core.engine.translation import ENGINE_ERRORS, translate, translated
from layerkeep.core.errors import ResourceConflict, ResourceNotFound


@dataclass(frozen=True)
class ExecResult:
    """How a command run in a container ended: its exit code and output (both streams)."""

    exit_code: int
    output: str


class RunningExec:
    """A command started in a container; :meth:`result` waits for it, or only a while.

    It runs on a daemon thread, so a command that hangs never holds its caller past the
    wait it chose, nor the process at exit.
    """

    def __init__(self, api: docker.APIClient, exec_id: str, action: str) -> None:
        self.exec_id = exec_id
        self._future: Future[ExecResult] = Future()
        self._api = api
        self._action = action
        threading.Thread(target=self._run, name=f"exec-{exec_id[:12]}", daemon=True).start()

    def _run(self) -> None:
        try:
            raw = self._api.exec_start(self.exec_id)
            code = self._api.exec_inspect(self.exec_id).get("ExitCode")
            output = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            self._future.set_result(ExecResult(1 if code is None else int(code), output))
        except ENGINE_ERRORS as error:
            self._future.set_exception(translate(error, action=self._action))
        except Exception as error:
            # Anything else (a client closed meanwhile) is the caller's to see, as it is.
            self._future.set_exception(error)

    def result(self, timeout: float | None = None) -> ExecResult | None:
        """The result once the command ended; None if it still runs after ``timeout`` s."""
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            return None


class ContainerCalls(Connection):
    """The Engine's calls on containers."""

    def create_container(
        self,
        image: str,
        *,
        name: str,
        network: str,
        aliases: Sequence[str] = (),
        command: str | Sequence[str] | None = None,
        environment: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        mounts: Sequence[tuple[str, str, bool]] = (),
        ports: Mapping[int, int] | None = None,
        working_dir: str | None = None,
        entrypoint: str | Sequence[str] | None = None,
    ) -> str:
        """Create (not start) a labelled container on ``network``; returns its id.

        ``mounts`` are (host path, container path, read only); ``ports`` map a container
        port to a host port published on 127.0.0.1 only.
        """
        hint = (
            "another run with the same project and build id holds the name: wait for it, "
            "or set LAYERKEEP_BUILD_ID"
        )
        with translated(f"create container {name}", resource=name, image=image, hint=hint):
            host_config = self.api.create_host_config(
                binds={source: {"bind": target, "mode": "ro" if ro else "rw"}
                       for source, target, ro in mounts},
                port_bindings={port: ("127.0.0.1", host) for port, host in (ports or {}).items()},
                network_mode=network,
            )
            networking = self.api.create_networking_config(
                {network: self.api.create_endpoint_config(aliases=list(aliases))}
            )
            created = self.api.create_container(
                image,
                name=name,
                command=command,
                environment=dict(environment or {}),
                labels={**self.labels, **(labels or {})},
                host_config=host_config,
                networking_config=networking,
                ports=list((ports or {}).keys()),
                working_dir=working_dir,
                entrypoint=entrypoint,
            )
        return str(created["Id"])

    def start_container(self, container: str) -> None:
        """Start a created container."""
        with translated(f"start container {container}", resource=container):
            self.api.start(container)

    def wait_container(self, container: str, *, timeout: float | None = None) -> int:
        """Wait until the container exits (at most ``timeout`` s); its exit code."""
        with translated(f"wait for container {container}", resource=container):
            status = self.api.wait(container, timeout=timeout)
        return int(status.get("StatusCode", 1))

    def inspect_container(self, container: str) -> dict[str, Any] | None:
        """A container's inspect record (``State``, ``Config``, ...), or None when gone."""
        try:
            with translated(f"inspect container {container}", resource=container):
                return dict(self.api.inspect_container(container))
        except ResourceNotFound:
            return None

    def list_containers(self, labels: Sequence[str]) -> list[dict[str, Any]]:
        """Containers, running or not, carrying every label (``key`` or ``key=value``)."""
        with translated("list containers"):
            found = self.api.containers(all=True, filters={"label": list(labels)})
        return [dict(c) for c in found]

    def container_output(self, container: str, *, tail: int | None = None) -> str:
        """What the container printed so far (both streams), the last ``tail`` lines."""
        with translated(f"read the logs of {container}", resource=container):
            raw = self.api.logs(container, stdout=True, stderr=True, tail=tail or "all")
        return raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)

    def follow_output(self, container: str) -> Iterator[str]:
        """The container's output lines as they come, until it exits."""
        with translated(f"read the logs of {container}", resource=container):
            yield from _lines(self.api.logs(container, stream=True, follow=True))

    def put_archive(self, container: str, path: str, data: bytes) -> None:
        """Unpack the tar archive ``data`` into the container at ``path``."""
        with translated(f"copy files into {container}", resource=container):
            self.api.put_archive(container, path, data)

    def remove_container(self, container: str) -> bool:
        """Force-remove a container and its anonymous volumes; False when already gone.

        Someone else removing it at the same moment (409) counts as gone.
        """
        try:
            with translated(f"remove container {container}", resource=container):
                self.api.remove_container(container, force=True, v=True)
        except (ResourceNotFound, ResourceConflict):
            return False
        return True

    def start_exec(
        self,
        container: str,
        command: Sequence[str],
        *,
        environment: Mapping[str, str] | None = None,
    ) -> RunningExec:
        """Start ``command`` in a running container; the one way we run commands in one.

        Values in ``environment`` stay off command lines (a password for psql). A
        container that is not running raises ResourceConflict; a missing one,
        ResourceNotFound.
        """
        action = f"run {command[0]} in {container}"
        with translated(action, resource=container):
            created = self.api.exec_create(
                container, list(command), environment=dict(environment or {})
            )
        return RunningExec(self.api, str(created["Id"]), action)

    def exec(
        self,
        container: str,
        command: Sequence[str],
        *,
        environment: Mapping[str, str] | None = None,
    ) -> ExecResult:
        """Run ``command`` in a running container to its end (bounded by the client timeout)."""
        result = self.start_exec(container, command, environment=environment).result()
        assert result is not None  # no timeout: it waited for the end
        return result


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode(errors="replace")
    if pending:
        yield pending.decode(errors="replace")
