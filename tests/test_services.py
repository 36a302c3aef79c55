"""Service containers on the real engine: up, readiness, failures, down and sweep.

Each test builds its own settings with a unique project or build id and an engine that
labels everything with that job and ``io.layerkeep.test=1``; the ``job`` fixture runs
``services_down`` for every job a test made, whatever happened.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from registry_setup import running_registry

from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.job import BUILD_ID_LABEL, Job
from layerkeep.core.secrets import MASK
from layerkeep.core.settings import Settings, load_settings, render_template
from layerkeep.services.containers import (
    SERVICE_LABEL,
    ensure_image,
    service_facts,
    services_down,
    services_up,
    sweep,
)
from layerkeep.services.readiness import ServiceNotReady

pytestmark = pytest.mark.docker

# Distinctive, and with characters a URL must quote.
PASSWORD = "Xq7-pw/zz:9@unseen"  # noqa: S105 - a throwaway test credential
DOCKER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")
NO_GIT = GitFacts(commit="", branch="")
CLIENT_TIMEOUT = 60


@dataclass
class CiJob:
    """One CI job's settings, its engine working for that job, and what it printed."""

    settings: Settings
    engine: Engine
    lines: list[str] = field(default_factory=list)

    @property
    def job(self) -> Job:
        return self.engine.job_for(self.settings)

    def log(self, line: str) -> None:
        self.lines.append(line)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def load(folder: Path, environ: dict[str, str]) -> Settings:
    return load_settings(folder, environ, git_facts=lambda _: NO_GIT)


@pytest.fixture
def project() -> str:
    return f"lktest-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def job(engine: Engine, tmp_path: Path, project: str) -> Iterator[Callable[..., CiJob]]:
    """Make jobs of one project; every one is taken down afterwards, even on failure."""
    made: list[CiJob] = []

    def make(**environ: str) -> CiJob:
        settings = load(
            tmp_path,
            {
                "LAYERKEEP_PROJECT": project,
                "LAYERKEEP_BUILD_ID": uuid.uuid4().hex[:10],
                "LAYERKEEP_DB_PASSWORD": PASSWORD,
                **environ,
            },
        )
        made.append(CiJob(settings, engine.for_job(Job.from_settings(settings))))
        return made[-1]

    try:
        yield make
    finally:
        for done in made:
            services_down(done.engine, done.settings, log=done.log)
            assert PASSWORD not in done.output


def run_client(job: CiJob, image: str, script: str, environment: dict[str, str]) -> tuple[int, str]:
    """Run ``sh -c script`` to its end in a labelled container on the job's network."""
    engine = job.engine
    container = engine.create_container(
        image,
        name=f"{job.job.container_name('client')}-{uuid.uuid4().hex[:6]}",
        network=job.job.network,
        command=["sh", "-c", script],
        environment=environment,
    )
    try:
        engine.start_container(container)
        code = engine.wait_container(container, timeout=CLIENT_TIMEOUT)
        return code, engine.container_output(container)
    finally:
        engine.remove_container(container)


def left_over(job: CiJob) -> tuple[list[str], list[str]]:
    """Names of this job's containers and networks still in the engine."""
    containers = job.engine.list_containers(job.job.label_filter)
    networks = job.engine.list_networks(job.job.label_filter)
    return [c["Names"][0] for c in containers], [n["Name"] for n in networks]


def job_of(settings: Settings) -> Job:
    return Job.from_settings(settings)


def inspect(job: CiJob, container: str) -> dict[str, Any]:
    attrs = job.engine.inspect_container(container)
    assert attrs is not None, container
    return attrs


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- names and facts (no engine needed) ------------------------------------------------


def test_names_follow_docker_rules_and_differ_per_job(tmp_path: Path) -> None:
    odd = load(tmp_path, {"LAYERKEEP_PROJECT": "My App/β", "LAYERKEEP_BUILD_ID": "12#3 x"})
    assert DOCKER_NAME.match(job_of(odd).network)
    assert DOCKER_NAME.match(job_of(odd).container_name("postgres"))
    assert job_of(odd).container_name("postgres").startswith(job_of(odd).network + "-")
    networks = {
        job_of(load(tmp_path, {"LAYERKEEP_PROJECT": project, "LAYERKEEP_BUILD_ID": build})).network
        for project, build in [("app", "7"), ("app", "8"), ("app", "a/b"), ("app", "a-b")]
    }
    assert len(networks) == 4
    plain = load(tmp_path, {"LAYERKEEP_PROJECT": "shop", "LAYERKEEP_BUILD_ID": "41-2"})
    assert job_of(plain).network == "layerkeep-shop-41-2"
    assert job_of(plain).container_name("redis") == "layerkeep-shop-41-2-redis"


def test_facts_per_kind(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        {
            "LAYERKEEP_SERVICES": "postgres,reports,redis,search",
            "LAYERKEEP_DB_USER": "app user",
            "LAYERKEEP_DB_PASSWORD": PASSWORD,
            "LAYERKEEP_REPORTS_KIND": "postgres",
            "LAYERKEEP_REPORTS_ENV": "POSTGRES_DB=reporting",
            "LAYERKEEP_SEARCH_IMAGE": "example/search:1",
            "LAYERKEEP_SEARCH_CONTAINER_PORT": "9200",
        },
    )
    facts = service_facts(settings)
    postgres = facts["postgres"]
    assert {k: v for k, v in postgres.items() if k != "url"} == {
        "host": "postgres", "port": "5432", "user": "app user", "password": PASSWORD,
        "database": "app_test",
    }
    url = urlsplit(postgres["url"])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "postgresql", "postgres", 5432, "/app_test"
    )
    assert PASSWORD not in postgres["url"]  # quoted: / : @ would break the URL
    assert (url.username, url.password) == ("app%20user", "Xq7-pw%2Fzz%3A9%40unseen")
    assert facts["reports"]["database"] == "reporting"
    assert facts["redis"] == {"host": "redis", "port": "6379", "user": "", "password": "",
                              "database": "", "url": "redis://redis:6379/0"}
    assert facts["search"] == {"host": "search", "port": "9200", "user": "", "password": "",
                               "database": "", "url": ""}
    assert render_template(settings.test_env["REDIS_URL"], facts) == "redis://redis:6379/0"


# --- on the engine ---------------------------------------------------------------------


def test_up_makes_postgres_and_redis_ready_and_a_second_up_reuses_them(
    job: Callable[..., CiJob],
) -> None:
    current = job(LAYERKEEP_SERVICES="postgres,redis")
    started = time.monotonic()
    running = services_up(current.engine, current.settings, log=current.log)
    first_took = time.monotonic() - started
    assert [r.name for r in running] == ["postgres", "redis"]
    assert not any(r.reused for r in running)
    for service in running:
        attrs = inspect(current, service.container_id)
        assert attrs["State"]["Running"]
        labels = attrs["Config"]["Labels"]
        assert labels[SERVICE_LABEL] == service.name
        assert labels["io.layerkeep.test"] == "1"
        assert labels[BUILD_ID_LABEL] == current.settings.build_id
        networks = attrs["NetworkSettings"]["Networks"]
        assert service.name in networks[current.job.network]["Aliases"]
        # No LAYERKEEP_<NAME>_PORT: nothing is published on the host.
        assert not attrs["HostConfig"]["PortBindings"]
        assert not any(attrs["NetworkSettings"]["Ports"].values())

    facts = service_facts(current.settings)
    code, output = run_client(
        current, "postgres:15", "psql \"$URL\" -tAc 'select current_database(), 1'",
        {"URL": facts["postgres"]["url"]},
    )
    assert (code, output.strip()) == (0, "app_test|1"), output
    code, output = run_client(
        current, "redis:7", 'redis-cli -u "$REDIS_URL" ping', {"REDIS_URL": facts["redis"]["url"]}
    )
    assert (code, output.strip()) == (0, "PONG"), output

    started = time.monotonic()
    again = services_up(current.engine, current.settings, log=current.log)
    second_took = time.monotonic() - started
    assert [r.container_id for r in again] == [r.container_id for r in running]
    assert all(r.reused for r in again)
    assert second_took < 2.0, second_took
    print(f"first up {first_took:.1f} s "
          f"({', '.join(f'{r.name} {r.ready_after:.1f} s' for r in running)}); "
          f"second up {second_took:.2f} s")


def test_an_exited_leftover_is_replaced(job: Callable[..., CiJob]) -> None:
    current = job(LAYERKEEP_SERVICES="redis")
    (first,) = services_up(current.engine, current.settings, log=current.log)
    current.engine.api.kill(first.container_id)
    (second,) = services_up(current.engine, current.settings, log=current.log)
    assert second.container_id != first.container_id
    assert not second.reused
    assert "replacing" in current.output


def test_a_host_port_is_published_on_localhost_only_when_set(job: Callable[..., CiJob]) -> None:
    port = free_port()
    current = job(LAYERKEEP_SERVICES="redis", LAYERKEEP_REDIS_PORT=str(port))
    (redis,) = services_up(current.engine, current.settings, log=current.log)
    attrs = inspect(current, redis.container_id)
    assert attrs["HostConfig"]["PortBindings"] == {
        "6379/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]
    }
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(b"PING\r\n")
        assert connection.recv(64) == b"+PONG\r\n"


def test_two_jobs_at_once_do_not_collide(job: Callable[..., CiJob]) -> None:
    first = job(LAYERKEEP_SERVICES="redis")
    second = job(LAYERKEEP_SERVICES="redis")
    (one,) = services_up(first.engine, first.settings, log=first.log)
    (two,) = services_up(second.engine, second.settings, log=second.log)
    assert one.container != two.container
    assert first.job.network != second.job.network
    assert not two.reused

    assert services_down(first.engine, first.settings, log=first.log) == 2
    assert left_over(first) == ([], [])
    assert inspect(second, two.container_id)["State"]["Running"]
    url = service_facts(second.settings)["redis"]["url"]
    code, output = run_client(second, "redis:7", 'redis-cli -u "$U" ping', {"U": url})
    assert (code, output.strip()) == (0, "PONG"), output


def test_without_a_ready_command_or_health_check_running_is_ready(
    job: Callable[..., CiJob],
) -> None:
    current = job(
        LAYERKEEP_SERVICES="sleeper",
        LAYERKEEP_SLEEPER_IMAGE="debian:bookworm-slim",
        LAYERKEEP_SLEEPER_COMMAND="sleep 300",
    )
    (sleeper,) = services_up(current.engine, current.settings, log=current.log)
    assert sleeper.awaited == "the container to keep running for 0.5 s"
    assert 0.5 <= sleeper.ready_after < 3


def test_the_image_health_check_is_awaited_and_unhealthy_fails_at_once(
    engine: Engine, job: Callable[..., CiJob], unique_repository: str, tmp_path: Path
) -> None:
    images = {}
    for name, check in (("healthy", "true"), ("sick", "false")):
        context = tmp_path / name
        context.mkdir()
        (context / "Dockerfile").write_text(
            "FROM debian:bookworm-slim\n"
            f"HEALTHCHECK --interval=200ms --timeout=2s --retries=2 CMD {check}\n"
            'CMD ["sleep", "300"]\n'
        )
        images[name] = f"{unique_repository}:{name}"
        engine.build(context, tag=images[name])

    healthy = job(LAYERKEEP_SERVICES="web", LAYERKEEP_WEB_IMAGE=images["healthy"],
                  LAYERKEEP_WEB_TIMEOUT="20")
    (web,) = services_up(healthy.engine, healthy.settings, log=healthy.log)
    assert web.awaited == "the image's health check to report healthy"
    state = inspect(healthy, web.container_id)["State"]
    assert state["Health"]["Status"] == "healthy"

    sick = job(LAYERKEEP_SERVICES="web", LAYERKEEP_WEB_IMAGE=images["sick"],
               LAYERKEEP_WEB_TIMEOUT="60")
    started = time.monotonic()
    with pytest.raises(ServiceNotReady) as caught:
        services_up(sick.engine, sick.settings, log=sick.log)
    assert time.monotonic() - started < 10
    assert "service web turned unhealthy" in caught.value.one_line()
    assert caught.value.state == "running, unhealthy"


def test_a_ready_command_that_never_succeeds_times_out_with_state_and_logs(
    job: Callable[..., CiJob],
) -> None:
    current = job(
        LAYERKEEP_SERVICES="stuck",
        LAYERKEEP_STUCK_IMAGE="debian:bookworm-slim",
        LAYERKEEP_STUCK_COMMAND="sh -c 'echo waiting-for-nothing; exec sleep 300'",
        LAYERKEEP_STUCK_READY="false",
        LAYERKEEP_STUCK_TIMEOUT="2",
    )
    started = time.monotonic()
    with pytest.raises(ServiceNotReady) as caught:
        services_up(current.engine, current.settings, log=current.log)
    took = time.monotonic() - started
    assert 2.0 <= took < 5.0, took
    error = caught.value
    line = error.one_line()
    assert "\n" not in line
    assert "service stuck not ready after 2 s" in line
    assert "`false` to exit 0 (it last exited 1)" in line
    assert "container is running" in line
    assert "LAYERKEEP_STUCK_TIMEOUT" in line
    assert (error.service, error.state, error.container_exit_code) == ("stuck", "running", None)
    assert error.last_lines == ["waiting-for-nothing"]
    assert "  | waiting-for-nothing" in current.lines
    assert "waiting-for-nothing" not in line


def test_a_ready_command_that_hangs_cannot_hold_the_wait_past_the_timeout(
    job: Callable[..., CiJob],
) -> None:
    current = job(
        LAYERKEEP_SERVICES="hung",
        LAYERKEEP_HUNG_IMAGE="debian:bookworm-slim",
        LAYERKEEP_HUNG_COMMAND="sleep 300",
        LAYERKEEP_HUNG_READY="sleep 120",
        LAYERKEEP_HUNG_TIMEOUT="2",
    )
    started = time.monotonic()
    with pytest.raises(ServiceNotReady) as caught:
        services_up(current.engine, current.settings, log=current.log)
    took = time.monotonic() - started
    assert 2.0 <= took < 5.0, took
    assert "`sleep 120` to exit 0 (it had not finished yet)" in caught.value.one_line()


def test_a_container_that_exits_fails_at_once_with_its_code_and_logs(
    job: Callable[..., CiJob],
) -> None:
    current = job(
        LAYERKEEP_SERVICES="boom",
        LAYERKEEP_BOOM_IMAGE="debian:bookworm-slim",
        LAYERKEEP_BOOM_COMMAND="sh -c 'echo boom; exit 3'",
        LAYERKEEP_BOOM_TIMEOUT="60",
    )
    started = time.monotonic()
    with pytest.raises(ServiceNotReady) as caught:
        services_up(current.engine, current.settings, log=current.log)
    assert time.monotonic() - started < 10
    error = caught.value
    assert error.container_exit_code == 3
    assert "exited (exit code 3)" in error.one_line()
    assert "\n" not in error.one_line()
    assert any("boom" in line for line in current.lines if line.startswith("  | "))


def test_a_missing_image_that_cannot_be_pulled_is_one_line_naming_it(
    job: Callable[..., CiJob], tmp_path: Path
) -> None:
    # A registry that answers, without the image: the same on every machine, online or not
    # (an unreachable registry is the other line, tested in test_fresh_machine.py).
    with running_registry(tmp_path / "registry") as registry:
        image = f"{registry.address}/no-such-image:1"
        current = job(LAYERKEEP_SERVICES="redis,ghost", LAYERKEEP_GHOST_IMAGE=image)
        with pytest.raises(DockerOperationError) as caught:
            services_up(current.engine, current.settings, log=current.log)
    assert left_over(current) == ([], [])  # checked before anything was created
    line = caught.value.one_line()
    assert "\n" not in line
    assert caught.value.image == image
    assert f"image {image} is not in the engine" in line
    assert "LAYERKEEP_CACHE_IMAGES" in line
    assert "pull failed: " in line
    # A present image is used as it is.
    assert ensure_image(current.engine, current.settings, "redis:7", log=current.log) == (
        current.engine.image_id("redis:7")
    )


def test_down_removes_containers_and_network_and_can_run_twice(
    job: Callable[..., CiJob],
) -> None:
    current = job(LAYERKEEP_SERVICES="redis")
    services_up(current.engine, current.settings, log=current.log)
    containers, networks = left_over(current)
    assert len(containers) == 1
    assert networks == [current.job.network]
    assert services_down(current.engine, current.settings, log=current.log) == 2
    assert left_over(current) == ([], [])
    assert current.engine.find_network(current.job.network) is None
    assert services_down(current.engine, current.settings, log=current.log) == 0


def test_sweep_removes_only_old_leftovers_of_the_project(
    job: Callable[..., CiJob], project: str
) -> None:
    # A killed job's leftovers: a network and a created (never started) container.
    killed = job()
    network = killed.job.network
    killed.engine.ensure_network(network)
    killed.engine.create_container(
        "debian:bookworm-slim",
        name=killed.job.container_name("leftover"),
        network=network,
        command=["true"],
    )
    # Another project's fresh job must survive any sweep of this one.
    other = job(LAYERKEEP_PROJECT=f"{project}-other")
    other.engine.ensure_network(other.job.network)
    lines: list[str] = []

    assert sweep(killed.engine, older_than=3600, log=lines.append, project=project) == 0
    assert left_over(killed) != ([], [])
    assert sweep(
        killed.engine, older_than=3600, log=lines.append, project=project, now=time.time() + 1800
    ) == 0
    # An hour and a bit later (the clock is passed in, not waited for): leftovers.
    assert sweep(
        killed.engine, older_than=3600, log=lines.append, project=project, now=time.time() + 3605
    ) == 2
    assert left_over(killed) == ([], [])
    assert left_over(other) == ([], [other.job.network])
    assert any(line.startswith("swept container") for line in lines)


def test_the_db_password_is_never_printed(job: Callable[..., CiJob]) -> None:
    # The service echoes the password it was given, then dies: its logs get printed.
    current = job(
        LAYERKEEP_SERVICES="leaky",
        LAYERKEEP_LEAKY_IMAGE="debian:bookworm-slim",
        LAYERKEEP_LEAKY_ENV=f"P={PASSWORD}",
        LAYERKEEP_LEAKY_COMMAND="sh -c 'echo \"connecting with $P\"; exit 1'",
    )
    with pytest.raises(ServiceNotReady) as caught:
        services_up(current.engine, current.settings, log=current.log)
    assert f"connecting with {MASK}" in caught.value.last_lines
    assert f"  | connecting with {MASK}" in current.lines
    assert PASSWORD not in current.output
    assert PASSWORD not in caught.value.one_line()
