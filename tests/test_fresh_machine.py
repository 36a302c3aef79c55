"""A fresh machine: an engine that is down, and no registry to pull from (one line each)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from clean_env import clean_environ

from layerkeep.building.builder import Builder
from layerkeep.building.image import build_image
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.engine_start import ensure_engine, start_refusal
from layerkeep.core.errors import BuildFailed, DockerOperationError
from layerkeep.core.registry_credentials import DOCKER_HUB, registry_host
from layerkeep.core.registry_failures import unreachable_registry
from layerkeep.core.settings import Settings, load_settings
from layerkeep.services.containers import ensure_image

# An official image no stand-in provides: pulling it needs a registry.
ABSENT_BASE = "python:3.12-slim"
# A registry no machine resolves (RFC 6761), for what an offline machine sees anywhere.
UNRESOLVABLE = "registry.invalid/library/"
DNS_FAILURE = "(no such host|server misbehaving|temporary failure in name resolution)"


@pytest.mark.parametrize(
    ("environ", "euid", "dockerd", "reason"),
    [
        ({}, 0, "/usr/sbin/dockerd", ""),
        ({"DOCKER_HOST": "unix:///run/docker.sock"}, 0, "/usr/sbin/dockerd", ""),
        ({"DOCKER_HOST": "tcp://10.0.0.5:2376"}, 0, "/usr/sbin/dockerd", "DOCKER_HOST names"),
        ({"DOCKER_HOST": "unix:///home/u/.docker/run/docker.sock"}, 0, "/x", "DOCKER_HOST"),
        ({}, 1000, "/usr/sbin/dockerd", "not root"),
        ({}, 0, None, "dockerd is not installed"),
    ],
)
def test_who_may_start_the_engine(
    environ: dict[str, str], euid: int, dockerd: str | None, reason: str
) -> None:
    found = start_refusal(environ, euid=euid, dockerd=dockerd)
    assert found.startswith(reason) if reason else found == ""


def test_unreachable_registry_is_told_from_other_failures() -> None:
    dns = (
        'Get "https://registry-1.docker.io/v2/": dial tcp: lookup registry-1.docker.io '
        "on 10.255.255.53:53: no such host"
    )
    assert unreachable_registry(dns) == "lookup registry-1.docker.io: no such host"
    assert unreachable_registry("dial tcp 10.1.1.1:443: connect: network is unreachable") == (
        "network is unreachable"
    )
    assert unreachable_registry("dial tcp 127.0.0.1:5000: connect: connection refused") is None
    assert unreachable_registry("manifest for postgres:99 not found: manifest unknown") is None


@pytest.mark.docker
def test_a_running_engine_is_left_alone(engine: Engine, tmp_path: Path) -> None:
    logged: list[str] = []
    assert ensure_engine(os.environ, log_path=tmp_path / "dockerd.log", log=logged.append) is False
    assert logged == []
    assert not (tmp_path / "dockerd.log").exists()


@pytest.mark.docker
def test_inv_against_an_engine_it_may_not_start_says_so_in_one_line(
    tmp_path: Path, engine: Engine
) -> None:
    (tmp_path / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    (tmp_path / "layerkeep.env").write_text("LAYERKEEP_SERVICES=redis\n")
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "services.up"],
        cwd=tmp_path,
        env=clean_environ(
            DOCKER_HOST=f"unix://{tmp_path}/absent.sock",
            LAYERKEEP_BUILD_ID=f"t{uuid.uuid4().hex[:8]}",
        ),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr == (
        f"layerkeep: services.up: cannot reach the Docker engine at DOCKER_HOST=unix://"
        f"{tmp_path}/absent.sock; not starting one: DOCKER_HOST names another engine (start "
        "it (`sudo systemctl start docker`, or `dockerd &` as root) or set DOCKER_HOST)\n"
    )


def offline_settings(root: Path, **environ: str) -> Settings:
    return load_settings(
        root,
        {"LAYERKEEP_COMMIT": "abc", "LAYERKEEP_BRANCH": "main", "LAYERKEEP_PUSH_RETRIES": "1",
         **environ},
        git_facts=lambda _: GitFacts("", ""),
    )


def require_unreachable(engine: Engine, image: str) -> None:
    """Skip unless asking for ``image`` fails for want of a registry, as it does offline.

    A name on ``.invalid`` (RFC 6761: never resolves) fails so on any machine, unless the
    engine sends its requests through a proxy, which answers in its own words. Docker
    Hub's names fail so only where no registry is reachable.
    """
    info = engine.api.info()
    if info.get("HttpProxy") or info.get("HttpsProxy"):
        pytest.skip("the engine pulls through a proxy, which answers for the registry")
    if engine.image_id(image) is not None:
        pytest.skip(f"{image} is present on this engine")
    try:
        engine.registry_digest(image, deadline=time.monotonic() + 60)
    except DockerOperationError as error:
        if unreachable_registry(error.message) is None:
            pytest.skip(f"this machine reaches the registry of {image}: {error.message}")
    else:
        pytest.skip(f"this machine reaches the registry of {image}")


def pull_failure(image: str) -> str:
    """The words of a failed pull of ``image``: no registry could be reached."""
    host = registry_host(image)
    host = "registry-1.docker.io" if host == DOCKER_HUB else host
    return rf"cannot pull {re.escape(image)} \(lookup {re.escape(host)}: {DNS_FAILURE}\) \("


@pytest.mark.docker
@pytest.mark.parametrize("registry", ["", UNRESOLVABLE])
def test_a_service_image_no_registry_can_serve(
    engine: Engine, tmp_path: Path, registry: str
) -> None:
    image = f"{registry}postgres:{uuid.uuid4().hex[:8]}"
    require_unreachable(engine, image)
    settings = offline_settings(tmp_path, LAYERKEEP_SERVICES="postgres")
    with pytest.raises(DockerOperationError) as caught:
        ensure_image(engine, settings, image, log=lambda _: None)
    line = caught.value.one_line()
    assert re.match(pull_failure(image), line), line
    assert "`inv standins.build` builds stand-ins of python:3.11-slim, postgres:15" in line
    assert engine.image_id(image) is None


@pytest.mark.docker
@pytest.mark.parametrize("registry", ["", UNRESOLVABLE])
@pytest.mark.parametrize("builder", [Builder("legacy"), Builder("buildkit", "/usr/bin/docker")])
def test_a_build_whose_base_no_registry_can_serve(
    engine: Engine, tmp_path: Path, unique_repository: str, builder: Builder, registry: str
) -> None:
    base = f"{registry}{ABSENT_BASE}"
    require_unreachable(engine, base)
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nRUN true\n")
    settings = offline_settings(tmp_path, LAYERKEEP_IMAGE=f"{unique_repository}/app")
    with pytest.raises(BuildFailed) as caught:
        build_image(engine, settings, builder, clean_environ(), log=lambda _: None)
    line = caught.value.one_line()
    assert re.match(
        rf"build {unique_repository}/app:latest failed: {pull_failure(base)}"
        "no registry is reachable",
        line,
    ), line
    assert "`inv standins.build`" in line
    assert caught.value.last_lines  # the builder's own words stay available
