"""The stand-in images, built and run on the real engine.

Each service is checked the way CI uses it: from another container on a user-defined
network (or, for the registry, through a port published on 127.0.0.1 only). Everything
a test creates carries ``io.layerkeep.test=1`` and is removed when the test ends. The
``engine`` fixture is the session's (conftest.py); the last tests cover engine_setup.

Where the official images are present (pulled: a connected machine), the service checks
run on them, and the stand-ins' own checks become: left alone. Images of an official
name that layerkeep did not make, and an engine without the base, are made for real on
a throw-away engine (``empty_engine``).
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import pytest
from conftest import SESSION_LABEL, TEST_LABEL
from docker.models.containers import Container
from engine_setup import Swept, ensure_engine, sweep
from second_engine import SecondEngineUnavailable, second_engine

from layerkeep.core.engine import Engine, connect
from layerkeep.core.errors import BuildFailed, ConfigError, DockerOperationError, EngineUnavailable
from layerkeep.standins.images import (
    BASE,
    IMAGES_DIR,
    STANDIN_IMAGE_LABEL,
    STANDIN_LABEL,
    STANDINS,
    Standin,
    build_base,
    ensure_standins,
)

pytestmark = pytest.mark.docker

TEST_LABELS = {"io.layerkeep.test": "1"}
READY_TIMEOUT = 60.0
RUN_TIMEOUT = 180


@dataclass(frozen=True)
class Ensured:
    """This module's ensure_standins call: the image ids before it, what it built and said."""

    before: dict[str, str | None]
    built: list[str]
    lines: list[str]


@pytest.fixture(scope="module")
def standins(engine: Engine) -> Ensured:
    """Every stand-in ensured (nothing built once the session has them, or has the
    official images)."""
    before = {reference: engine.image_id(reference) for reference in STANDINS}
    lines: list[str] = []
    built = ensure_standins(engine, log=lines.append)
    return Ensured(before, built, lines)


def is_standin(attrs: dict[str, Any], standin: Standin) -> bool:
    """Whether the image is layerkeep's stand-in for ``standin`` (else, say, a pulled one)."""
    labels = attrs["Config"]["Labels"] or {}
    return bool(labels.get(STANDIN_IMAGE_LABEL) == standin.reference)


@pytest.fixture(scope="module")
def empty_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A throw-away engine that starts with no images (skipped where none can run); its
    tests use names apart from each other's."""
    try:
        with second_engine(tmp_path_factory.mktemp("empty-engine")) as second:
            connected = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            try:
                yield connected
            finally:
                connected.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))


def one_file_image(engine: Engine, reference: str, *, labels: dict[str, str]) -> str:
    """Import a tiny image (one file) carrying ``labels``, tag it ``reference``; its id."""
    image_id = engine.import_image(
        iter([_tar("hello.txt", uuid.uuid4().bytes, 0o644)]),
        reference=reference,
        changes=[f'LABEL {key}="{value}"' for key, value in labels.items()],
    )
    engine.tag_image(image_id, reference)
    return image_id


@pytest.fixture
def network(engine: Engine) -> Iterator[str]:
    name = f"layerkeep-test-{uuid.uuid4().hex[:10]}"
    created = engine.client.networks.create(name, driver="bridge", labels=dict(engine.labels))
    try:
        yield name
    finally:
        created.remove()


@contextmanager
def started(
    engine: Engine,
    image: str,
    *,
    command: Sequence[str] | None = None,
    network: str | None = None,
    environment: Mapping[str, str] | None = None,
    ports: Mapping[str, tuple[str, None]] | None = None,
    files: Mapping[str, tuple[bytes, int]] | None = None,
) -> Iterator[Container]:
    """A labelled container, started, and removed with its volumes on exit.

    ``files`` maps absolute paths to (content, mode); they are put in before start,
    which is how a test hands files to a container without mounting anything.
    """
    container = engine.client.containers.create(
        image,
        command=list(command) if command is not None else None,
        name=f"layerkeep-test-{uuid.uuid4().hex[:10]}",
        labels=dict(engine.labels),
        network=network,
        environment=dict(environment or {}),
        ports=dict(ports or {}),
    )
    try:
        for path, (content, mode) in (files or {}).items():
            assert container.put_archive(
                str(Path(path).parent), _tar(Path(path).name, content, mode)
            )
        container.start()
        container.reload()
        yield container
    finally:
        container.remove(force=True, v=True)


def run_once(
    engine: Engine,
    image: str,
    command: Sequence[str],
    *,
    network: str | None = None,
    environment: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    """Run ``command`` in a fresh container to its end: exit code and output."""
    with started(
        engine, image, command=command, network=network, environment=environment
    ) as container:
        # Images may declare volumes; nothing from the host goes in.
        assert [m for m in container.attrs["Mounts"] if m["Type"] != "volume"] == []
        status = container.wait(timeout=RUN_TIMEOUT)
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
        return int(status["StatusCode"]), output


def wait_until(
    container: Container,
    check: Callable[[], bool],
    *,
    what: str,
    timeout: float = READY_TIMEOUT,
    interval: float = 0.5,
) -> None:
    """Poll ``check``; fail at once if the container stops, else after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        container.reload()
        if container.status != "running" or time.monotonic() > deadline:
            logs = container.logs(tail=15).decode(errors="replace").strip()
            pytest.fail(
                f"{what}: not after {timeout:.0f} s; container {container.name} is "
                f"{container.status}; last log lines:\n{logs}"
            )
        time.sleep(interval)


def _tar(name: str, content: bytes, mode: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(content)
        info.mode = mode
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_every_official_name_is_present_as_a_labelled_standin_or_left_alone(
    engine: Engine, standins: Ensured
) -> None:
    assert set(standins.built) <= set(STANDINS)
    for standin in STANDINS.values():
        attrs = engine.image_attrs(standin.reference)
        assert attrs is not None, standin.reference
        if is_standin(attrs, standin):
            assert attrs["Config"]["Labels"][STANDIN_LABEL] == "1"
            for alias in standin.aliases:
                assert engine.image_id(alias) == attrs["Id"], alias
        else:
            # An image layerkeep did not make, such as the official one pulled: kept.
            assert attrs["Id"] == standins.before[standin.reference]
            assert standin.reference not in standins.built
            assert f"{standin.reference}: present, not a stand-in (left alone)" in (
                standins.lines
            )
    postgres = engine.image_attrs("postgres:15")
    assert postgres is not None
    assert postgres["Config"]["StopSignal"] == "SIGINT"
    assert "PGDATA=/var/lib/postgresql/data" in postgres["Config"]["Env"]


def test_second_call_builds_nothing(engine: Engine, standins: Ensured) -> None:
    lines: list[str] = []
    assert ensure_standins(engine, log=lines.append) == []
    expected = []
    for reference, standin in STANDINS.items():
        attrs = engine.image_attrs(reference)
        assert attrs is not None
        said = "already present" if is_standin(attrs, standin) else (
            "present, not a stand-in (left alone)"
        )
        expected.append(f"{reference}: {said}")
    assert lines == expected


def test_an_image_layerkeep_did_not_make_is_never_replaced(empty_engine: Engine) -> None:
    """A pulled official image (here: any image without the stand-in labels) keeps its
    name and its aliases; a stand-in's missing alias is tagged, a foreign one is not."""
    foreign = one_file_image(empty_engine, "postgres:15", labels={"org.example": "official"})
    empty_engine.tag_image(foreign, "redis:7.0")  # an alias of redis:7, not ours either
    ours = one_file_image(
        empty_engine, "redis:7", labels={STANDIN_LABEL: "1", STANDIN_IMAGE_LABEL: "redis:7"}
    )
    lines: list[str] = []

    assert ensure_standins(empty_engine, names=["postgres:15", "redis:7"], log=lines.append) == []
    assert ensure_standins(empty_engine, names=["postgres:15"], force=True, log=lines.append) == []

    assert lines == [
        "postgres:15: present, not a stand-in (left alone)",
        "redis:7: already present",
        "postgres:15: present, not a stand-in (left alone)",
    ]
    assert empty_engine.image_id("postgres:15") == foreign
    assert empty_engine.image_id("postgres:15-bookworm") is None
    assert empty_engine.image_id("redis:7.0") == foreign
    assert empty_engine.image_id("redis:7-bookworm") == ours


def test_python_runs_and_pip_reaches_pypi_with_the_baked_in_ca_bundle(
    engine: Engine, standins: Ensured
) -> None:
    code, output = run_once(
        engine, "python:3.11-slim", ["python", "-c", "import sys; print(sys.version_info[:2])"]
    )
    assert (code, output.strip()) == (0, "(3, 11)")

    code, output = run_once(engine, "python:3.11-slim", ["pip", "--version"])
    assert code == 0, output
    assert "python 3.11" in output

    # No mount anywhere (run_once checks): PyPI's certificate verifies only through the
    # bundle in the image.
    code, output = run_once(
        engine, "python:3.11-slim", ["pip", "download", "--no-deps", "--dest", "/tmp/d", "six"]
    )
    assert code == 0, output
    assert "Saved /tmp/d/six-" in output

    # A global install works, as in the official image (no PEP 668 marker).
    code, output = run_once(engine, "python:3.11-slim", ["pip", "install", "--no-deps", "six"])
    assert code == 0, output


def test_pip_install_works_inside_docker_build(
    engine: Engine, standins: Ensured, tmp_path: Path
) -> None:
    # What the CA bundle is for: a user's Dockerfile that installs from PyPI, unchanged.
    reference = f"layerkeep-test/pip-build:{uuid.uuid4().hex[:10]}"
    (tmp_path / "Dockerfile").write_text(
        "FROM python:3.11-slim\nRUN pip install --no-cache-dir --no-deps six\n"
        'CMD ["python", "-c", "import six; print(six.__name__)"]\n'
    )
    try:
        engine.build(tmp_path, tag=reference, labels=TEST_LABELS)
        code, output = run_once(engine, reference, [])
        assert (code, output.strip()) == (0, "six")
    finally:
        if engine.image_id(reference) is not None:
            engine.api.remove_image(reference, force=True)


def test_postgres_initialises_like_the_official_image_and_serves_the_network(
    engine: Engine, standins: Ensured, network: str
) -> None:
    password = "s3cret-for-test"  # noqa: S105 - a throwaway container's password
    schema = b"CREATE TABLE greeting (word text);\nINSERT INTO greeting VALUES ('from-sql');\n"
    script = (
        b"#!/bin/sh\nset -e\n"
        b'psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" '
        b"-c \"INSERT INTO greeting VALUES ('from-sh')\"\n"
    )
    environment = {"POSTGRES_PASSWORD": password, "POSTGRES_USER": "app", "POSTGRES_DB": "appdb"}
    files = {
        "/docker-entrypoint-initdb.d/01-schema.sql": (schema, 0o644),
        "/docker-entrypoint-initdb.d/02-more.sh": (script, 0o755),
    }
    with started(
        engine, "postgres:15", network=network, environment=environment, files=files
    ) as server:

        def ready() -> bool:
            result = server.exec_run(["pg_isready", "-h", "127.0.0.1", "-U", "app"])
            return bool(result.exit_code == 0)

        wait_until(server, ready, what="pg_isready -h 127.0.0.1")

        sql = (
            "SELECT string_agg(word, ',' ORDER BY word)"
            " || ' ' || current_setting('server_encoding') FROM greeting"
        )
        query = ["psql", "-h", str(server.name), "-U", "app", "-d", "appdb", "-tAc", sql]
        code, output = run_once(
            engine, "postgres:15", query, network=network, environment={"PGPASSWORD": password}
        )
        assert (code, output.strip()) == (0, "from-sh,from-sql UTF8")

        # The host line asks for the password rather than trusting the network.
        code, output = run_once(
            engine, "postgres:15", query, network=network, environment={"PGPASSWORD": "wrong"}
        )
        assert code != 0
        assert "password authentication failed" in output


def test_postgres_without_a_password_refuses_to_start(engine: Engine, standins: Ensured) -> None:
    with started(engine, "postgres:15") as server:
        status = server.wait(timeout=RUN_TIMEOUT)
        output = server.logs().decode(errors="replace")
    assert status["StatusCode"] == 1
    assert "POSTGRES_PASSWORD" in output


def test_redis_answers_another_container(engine: Engine, standins: Ensured, network: str) -> None:
    with started(engine, "redis:7", network=network) as server:

        def ready() -> bool:
            return bool(server.exec_run(["redis-cli", "ping"]).output.strip() == b"PONG")

        wait_until(server, ready, what="redis-cli ping")

        code, output = run_once(
            engine, "redis:7", ["redis-cli", "-h", str(server.name), "ping"], network=network
        )
        assert (code, output.strip()) == (0, "PONG")


def test_registry_answers_v2_on_a_loopback_port(engine: Engine, standins: Ensured) -> None:
    with started(engine, "registry:2", ports={"5000/tcp": ("127.0.0.1", None)}) as server:
        (binding,) = server.attrs["NetworkSettings"]["Ports"]["5000/tcp"]
        assert binding["HostIp"] == "127.0.0.1"
        url = f"http://127.0.0.1:{binding['HostPort']}/v2/"
        # No proxy, whatever the environment says: the registry is on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        answers: list[int] = []

        def answered() -> bool:
            try:
                with opener.open(url, timeout=2) as response:
                    answers.append(response.status)
            except (urllib.error.URLError, ConnectionError):
                return False
            return True

        wait_until(server, answered, what=f"GET {url}")
        assert answers[-1] == 200


def test_unknown_name_is_a_config_error(engine: Engine) -> None:
    with pytest.raises(ConfigError, match=r"no stand-in for postgres:16"):
        ensure_standins(engine, names=["redis:7", "postgres:16"])


def test_missing_mmdebstrap_is_one_line_and_touches_nothing(
    empty_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An engine without the base: the one place mmdebstrap is needed.
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(DockerOperationError) as caught:
        ensure_standins(empty_engine, names=["python:3.11"], log=lambda _line: None)
    assert caught.value.image == BASE
    assert "apt-get install mmdebstrap" in caught.value.one_line()
    assert "\n" not in caught.value.one_line()
    assert empty_engine.image_id(BASE) is None
    assert empty_engine.image_id("python:3.11-slim") is None


def test_unreachable_mirror_is_one_line_and_tags_nothing(
    engine: Engine, standins: Ensured
) -> None:
    reference = "layerkeep-test/base:unreachable"
    with pytest.raises(DockerOperationError) as caught:
        build_base(
            engine,
            reference,
            IMAGES_DIR / "debian",
            sources=["deb http://127.0.0.1:9/debian bookworm main"],
        )
    message = caught.value.one_line()
    assert "mmdebstrap failed" in message
    if os.geteuid() == 0:
        assert "127.0.0.1:9" in message
        assert "mirror is unreachable" in message
    else:  # mmdebstrap stops before the network: it needs root for its chroot
        assert "run `inv standins.build` as root once" in message
    assert "\n" not in message
    assert engine.image_id(reference) is None


def test_build_failure_names_the_image_and_keeps_the_last_lines(
    engine: Engine, standins: Ensured, tmp_path: Path
) -> None:
    reference = "layerkeep-test/broken:1"
    (tmp_path / "Dockerfile").write_text(f"FROM {BASE}\nRUN echo about-to-fail && false\n")
    with pytest.raises(BuildFailed) as caught:
        engine.build(tmp_path, tag=reference, labels=TEST_LABELS)
    assert caught.value.image == reference
    assert reference in caught.value.message
    assert "non-zero code" in caught.value.message
    assert "about-to-fail" in caught.value.last_lines
    assert engine.image_id(reference) is None


def test_ensure_engine_does_not_start_a_daemon_for_another_host(tmp_path: Path) -> None:
    environ = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/absent.sock"}
    with pytest.raises(EngineUnavailable, match="not starting one: DOCKER_HOST names another"):
        ensure_engine(environ, log_path=tmp_path / "dockerd.log")
    assert not (tmp_path / "dockerd.log").exists()


def test_sweep_removes_labelled_containers_networks_and_images(
    engine: Engine, standins: Ensured, tmp_path: Path
) -> None:
    key, value = "io.layerkeep.sweep-test", uuid.uuid4().hex
    labels = {**TEST_LABELS, key: value}
    reference = f"layerkeep-test/sweep:{value[:10]}"
    (tmp_path / "Dockerfile").write_text(f'FROM {BASE}\nCMD ["sleep", "60"]\n')
    engine.build(tmp_path, tag=reference, labels=labels)
    network = engine.client.networks.create(f"layerkeep-test-{value[:10]}", labels=labels)
    container = engine.client.containers.run(
        reference, detach=True, labels=labels, network=network.name
    )
    unrelated = engine.client.networks.create(
        f"layerkeep-test-{value[10:20]}", labels=dict(TEST_LABELS)
    )
    try:
        assert sweep(engine, key, value) == Swept(containers=1, networks=1, images=1)
        selector = {"label": f"{key}={value}"}
        assert engine.api.containers(all=True, filters=selector) == []
        assert engine.api.networks(filters=selector) == []
        assert engine.image_id(reference) is None
        assert sweep(engine, key, value) == Swept(containers=0, networks=0, images=0)
        unrelated.reload()  # still there: a sweep only takes what carries its label
    finally:
        # If the sweep under test failed, remove by hand what it should have taken.
        unrelated.remove()
        with suppress(docker.errors.NotFound):
            container.remove(force=True)
        with suppress(docker.errors.NotFound):
            network.remove()
        with suppress(docker.errors.ImageNotFound):
            engine.api.remove_image(reference, force=True)
