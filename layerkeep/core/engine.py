"""The one wrapper around docker-py: connection, labels, and in-band stream errors."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions

from layerkeep.core.errors import BuildFailed, DockerOperationError, EngineUnavailable

LABEL_PREFIX = "io.layerkeep"
PROJECT_LABEL = f"{LABEL_PREFIX}.project"
BUILD_ID_LABEL = f"{LABEL_PREFIX}.build-id"
DEFAULT_TIMEOUT = 120
# A build's longest silence (apt unpacking postgresql, pip compiling) is well under this.
BUILD_TIMEOUT = 900
_LAST_LINES = 20


@dataclass(frozen=True)
class Engine:
    """A connected Docker engine and the labels that mark what we create on it."""

    client: docker.DockerClient
    where: str
    labels: Mapping[str, str]

    @property
    def api(self) -> docker.APIClient:
        """The low-level client, one method per engine endpoint."""
        return self.client.api

    def image_id(self, reference: str) -> str | None:
        """The id of a local image, or None when the engine lacks it."""
        try:
            return str(self.api.inspect_image(reference)["Id"])
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as error:
            # An invalid reference is answered with 400, not 404.
            if error.status_code == 400:
                return None
            raise

    def build(
        self,
        context: Path,
        *,
        tag: str,
        dockerfile: str | None = None,
        target: str | None = None,
        cache_from: Sequence[str] = (),
        build_args: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        nocache: bool = False,
        on_line: Callable[[str], None] = lambda _: None,
    ) -> str:
        """Build with the classic builder (never pulling) as ``tag``; return the image id.

        Each output line goes to ``on_line``; a failure raises BuildFailed with the last
        lines of output.
        """
        tail: deque[str] = deque(maxlen=_LAST_LINES)
        built: str | None = None
        try:
            chunks = self.api.build(
                path=str(context),
                dockerfile=dockerfile,
                tag=tag,
                target=target,
                cache_from=list(cache_from),
                buildargs=dict(build_args or {}),
                labels=dict(labels or {}),
                decode=True,
                rm=True,
                forcerm=True,
                pull=False,
                nocache=nocache,
                timeout=BUILD_TIMEOUT,
            )
            for chunk in checked_stream(chunks, action="build", image=tag):
                for line in str(chunk.get("stream", "")).splitlines():
                    if line.strip():
                        tail.append(line.rstrip())
                        on_line(line.rstrip())
                aux = chunk.get("aux")
                if isinstance(aux, dict) and "ID" in aux:
                    built = str(aux["ID"])
        except DockerOperationError as error:
            raise BuildFailed(error.message, image=tag, last_lines=list(tail)) from None
        except (docker.errors.APIError, requests.exceptions.RequestException) as error:
            raise BuildFailed(
                f"build {tag} failed: {_first_line(error)}", image=tag, last_lines=list(tail)
            ) from None
        found = self.image_id(tag)
        if found is None or (built is not None and found != built):
            raise BuildFailed(
                f"build {tag} ended without tagging an image", image=tag, last_lines=list(tail)
            )
        return found

    def ensure_network(self, name: str, *, labels: Mapping[str, str] | None = None) -> str:
        """The id of a user-defined bridge network ``name``, created (labelled) if missing."""
        for network in self.api.networks(names=[name]):
            if network["Name"] == name:
                return str(network["Id"])
        created = self.api.create_network(
            name, driver="bridge", labels={**self.labels, **(labels or {})}, check_duplicate=True
        )
        return str(created["Id"])

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

    def image_attrs(self, reference: str) -> dict[str, Any] | None:
        """The engine's inspect record of a local image, or None."""
        try:
            return dict(self.api.inspect_image(reference))
        except docker.errors.ImageNotFound:
            return None


def describe_host(environ: Mapping[str, str]) -> str:
    """Where docker-py looks for the engine, in words a user can check."""
    host = environ.get("DOCKER_HOST")
    return f"DOCKER_HOST={host}" if host else "unix:///var/run/docker.sock (DOCKER_HOST unset)"


def connect(
    environ: Mapping[str, str],
    *,
    labels: Mapping[str, str],
    timeout: int = DEFAULT_TIMEOUT,
) -> Engine:
    """Connect to the engine named by ``environ`` (DOCKER_HOST & co.) and check it answers."""
    where = describe_host(environ)
    hint = "start it (`sudo systemctl start docker`, or `dockerd &` as root) or set DOCKER_HOST"
    client: docker.DockerClient | None = None
    try:
        client = docker.DockerClient(
            **docker.utils.kwargs_from_env(environment=dict(environ)), timeout=timeout
        )
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
        if client is not None:
            client.close()
        raise EngineUnavailable(
            f"cannot reach the Docker engine at {where}: {_first_line(error)}", hint=hint
        ) from error
    return Engine(client=client, where=where, labels=dict(labels))


def checked_stream(
    chunks: Iterable[Mapping[str, Any]], *, action: str, image: str
) -> Iterator[Mapping[str, Any]]:
    """Pass decoded stream records through, raising on the errors engines send in-band.

    Push, pull, load and build answer 200 and report failure inside the stream. The
    stream is read to its end before raising, so its connection is released.
    """
    records = iter(chunks)
    for chunk in records:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail") or {}
            message = str(chunk.get("error") or detail.get("message") or "unknown error")
            for _ in records:
                pass
            raise DockerOperationError(f"{action} {image} failed: {message.strip()}", image=image)
        yield chunk


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
