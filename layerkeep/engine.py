"""The one wrapper around docker-py: connection, labels, and in-band stream errors."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import docker
import docker.errors
import requests.exceptions

from layerkeep.errors import DockerOperationError, EngineUnavailable

LABEL_PREFIX = "io.layerkeep"
PROJECT_LABEL = f"{LABEL_PREFIX}.project"
BUILD_ID_LABEL = f"{LABEL_PREFIX}.build-id"
DEFAULT_TIMEOUT = 120


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
