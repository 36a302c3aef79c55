"""The Engine: a connected Docker engine, the job it works for, and every call layerkeep
makes on it (grouped by what they act on, one module each, as docker-py's own client)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
import docker.utils
import requests.exceptions

from layerkeep.core.engine.containers import ContainerCalls
from layerkeep.core.engine.images import ImageCalls
from layerkeep.core.engine.networks import NetworkCalls
from layerkeep.core.engine.transfers import TransferCalls
from layerkeep.core.engine.translation import first_line, translated
from layerkeep.core.errors import EngineUnavailable, LayerkeepError
from layerkeep.core.job import Job
from layerkeep.core.settings import Settings

DEFAULT_TIMEOUT = 120


@dataclass(frozen=True)
class Engine(ImageCalls, TransferCalls, NetworkCalls, ContainerCalls):
    """A connected Docker engine, the job it works for, and the labels it stamps.

    ``labels`` always include the job's (an engine without a job, for stand-ins and
    tests, stamps only the labels it was given). Close it, or use it as a context manager.
    """

    client: docker.DockerClient
    where: str
    labels: Mapping[str, str]
    job: Job | None = field(default=None)

    def __post_init__(self) -> None:
        if self.job is not None:
            object.__setattr__(self, "labels", {**self.labels, **self.job.labels})

    def for_job(self, job: Job) -> Engine:
        """This connection working for ``job``: its labels on top of ours."""
        return dataclasses.replace(self, job=job)

    def job_for(self, settings: Settings) -> Job:
        """The job this engine works for, which must be the one ``settings`` describe."""
        if self.job is None or (self.job.project, self.job.build_id) != (
            settings.project, settings.build_id,
        ):
            raise LayerkeepError(
                f"the engine at {self.where} works for {self.job or 'no job'}, not for "
                f"project {settings.project} build {settings.build_id}",
                hint="connect(environ, job=Job.from_settings(settings))",
            )
        return self.job

    def server_version(self) -> dict[str, Any]:
        """The engine's version record (Version, ApiVersion, Os, ...)."""
        with translated("ask the engine its version"):
            return dict(self.api.version())


def describe_host(environ: Mapping[str, str]) -> str:
    """Where docker-py looks for the engine, in words a user can check."""
    host = environ.get("DOCKER_HOST")
    return f"DOCKER_HOST={host}" if host else "unix:///var/run/docker.sock (DOCKER_HOST unset)"


def connect(
    environ: Mapping[str, str],
    *,
    job: Job | None = None,
    labels: Mapping[str, str] | None = None,
    timeout: int = DEFAULT_TIMEOUT,
) -> Engine:
    """Connect to the engine named by ``environ`` (DOCKER_HOST & co.) and check it answers.

    What it creates carries the job's labels; ``labels`` are for callers without a job
    (stand-ins, tests) or extra ones.
    """
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
            f"cannot reach the Docker engine at {where}: {first_line(error)}", hint=hint
        ) from error
    return Engine(client=client, where=where, labels=dict(labels or {}), job=job)
