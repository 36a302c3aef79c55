"""A fresh machine: an engine that is down, and no registry to pull from (one line each)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from layerkeep.build.image import Builder, build_image
from layerkeep.core.engine import Engine
from layerkeep.core.engine_start import ensure_engine, start_refusal
from layerkeep.core.errors import BuildFailed, DockerOperationError
from layerkeep.core.registry import unreachable_registry
from layerkeep.core.settings import Settings, load_settings
from layerkeep.services.containers import ensure_image

# An official image no stand-in provides: pulling it needs a registry.
ABSENT_BASE = "python:3.12-slim"


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
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LAYERKEEP_")}
    environ["DOCKER_HOST"] = f"unix://{tmp_path}/absent.sock"
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "services.up"],
        cwd=tmp_path,
        env={**environ, "LAYERKEEP_BUILD_ID": f"t{uuid.uuid4().hex[:8]}"},
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
    )


def require_offline(engine: Engine, image: str) -> None:
    if engine.image_id(image) is not None:
        pytest.skip(f"{image} is present on this engine")


@pytest.mark.docker
def test_a_service_image_no_registry_can_serve(engine: Engine, tmp_path: Path) -> None:
    image = f"postgres:{uuid.uuid4().hex[:8]}"
    settings = offline_settings(tmp_path, LAYERKEEP_SERVICES="postgres")
    with pytest.raises(DockerOperationError) as caught:
        ensure_image(engine, settings, image, log=lambda _: None)
    line = caught.value.one_line()
    if "no such host" not in line and "unreachable" not in line:
        pytest.skip(f"this machine reaches a registry: {line}")
    assert line.startswith(f"cannot pull {image} (lookup registry-1.docker.io: no such host) (")
    assert "`inv standins.build` builds stand-ins of python:3.11-slim, postgres:15" in line


@pytest.mark.docker
@pytest.mark.parametrize("builder", [Builder("legacy"), Builder("buildkit", "/usr/bin/docker")])
def test_a_build_whose_base_no_registry_can_serve(
    engine: Engine, tmp_path: Path, unique_repository: str, builder: Builder
) -> None:
    require_offline(engine, ABSENT_BASE)
    (tmp_path / "Dockerfile").write_text(f"FROM {ABSENT_BASE}\nRUN true\n")
    settings = offline_settings(tmp_path, LAYERKEEP_IMAGE=f"{unique_repository}/app")
    with pytest.raises(BuildFailed) as caught:
        build_image(engine, settings, builder, os.environ, log=lambda _: None)
    line = caught.value.one_line()
    assert line.startswith(
        f"build {unique_repository}/app:latest failed: cannot pull {ABSENT_BASE} "
        "(lookup registry-1.docker.io: no such host) (no registry is reachable"
    ), line
    assert "`inv standins.build`" in line
    assert caught.value.last_lines  # the builder's own words stay available
