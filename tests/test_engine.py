"""The engine adapter and the job identity.

The source scan holds the line "only core/engine/ talks to docker-py"; the engine tests
cause each failure for real (a name clash, a stopped container, a missing one, a command
that hangs) and check the one-line error we turn it into.
"""

from __future__ import annotations

import ast
import base64
import io
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest

from layerkeep.building.replaced_images import remove_replaced
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, translate
from layerkeep.core.errors import (
    DockerOperationError,
    LayerkeepError,
    ResourceConflict,
    ResourceNotFound,
)
from layerkeep.core.job import BUILD_ID_LABEL, PROJECT_LABEL, Job
from layerkeep.core.secrets import MASK
from layerkeep.core.settings import Settings, load_settings

PACKAGE = Path(__file__).resolve().parent.parent / "layerkeep"
ENGINE_PACKAGE = PACKAGE / "core" / "engine"
CLIENT_MODULES = ("docker", "requests")
# The registry's own HTTP API (what the engine cannot do) is spoken with requests there.
REGISTRY_API_MODULES = [
    PACKAGE / "core" / name for name in ("registry_api.py", "registry_api_errors.py")
]
SECRET = "s3cr/t:p@ss"  # noqa: S105 - a throwaway value to mask
REGISTRY_SECRET = "reg-pass-42"  # noqa: S105 - the same


def settings_for(folder: Path, **values: str) -> Settings:
    environ = {f"LAYERKEEP_{key.upper()}": value for key, value in values.items()}
    return load_settings(folder, environ, git_facts=lambda _: GitFacts("", ""))


# --- one adapter -----------------------------------------------------------------------


def client_uses(source: str) -> list[str]:
    """Where ``source`` imports docker/requests or reaches for ``.api``/``.client``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Attribute) and node.attr in ("api", "client"):
            found.append((node.lineno, ast.unparse(node)))
            continue
        else:
            continue
        found += [
            (node.lineno, f"import {name}")
            for name in names
            if name.split(".")[0] in CLIENT_MODULES
        ]
    return [f"line {line}: {what}" for line, what in sorted(found)]


def test_the_scan_sees_each_kind_of_use() -> None:
    source = (
        "import docker.errors\nfrom requests import exceptions\n"
        "engine.api.tag(x)\nc = engine.client\nsettings.registry_client_id\n"
    )
    assert client_uses(source) == [
        "line 1: import docker.errors",
        "line 2: import requests",
        "line 3: engine.api",
        "line 4: engine.client",
    ]


def test_only_the_engine_module_touches_docker_py() -> None:
    offenders = {
        str(path.relative_to(PACKAGE.parent)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if not path.is_relative_to(ENGINE_PACKAGE)
        and (uses := client_uses(path.read_text(encoding="utf-8")))
    }
    # The registry API client may use requests itself, and nothing of docker-py.
    allowed = {
        str(path.relative_to(PACKAGE.parent)): ["import requests"] for path in REGISTRY_API_MODULES
    }
    extra = {
        path: [use for use in uses if use.split(": ", 1)[1] not in allowed.get(path, [])]
        for path, uses in offenders.items()
    }
    assert {path: uses for path, uses in extra.items() if uses} == {}, (
        "use (or add) a method on layerkeep.core.engine.Engine"
    )


def test_translate_is_one_line_and_keeps_the_status() -> None:
    # A lost connection cannot be caused on the shared engine; requests' own error type
    # is what docker-py lets through then.
    import requests.exceptions  # noqa: PLC0415 - only this test builds a client error

    lost = requests.exceptions.ConnectionError("Connection aborted.\n  (reset by peer)")
    error = translate(lost, action="push x:1")
    assert isinstance(error, DockerOperationError)
    assert error.one_line() == (
        "push x:1 failed: ConnectionError: Connection aborted. (reset by peer)"
    )
    assert error.status is None
    assert translate(lost).message.startswith("the Docker engine failed: ConnectionError")


# --- the job ---------------------------------------------------------------------------


def test_the_job_comes_from_the_settings_with_names_and_labels(tmp_path: Path) -> None:
    job = Job.from_settings(settings_for(tmp_path, project="shop", build_id="41-2"))
    assert job.labels == {PROJECT_LABEL: "shop", BUILD_ID_LABEL: "41-2"}
    assert job.label_filter == [f"{PROJECT_LABEL}=shop", f"{BUILD_ID_LABEL}=41-2"]
    assert job.network == "layerkeep-shop-41-2"
    assert job.container_name("redis") == "layerkeep-shop-41-2-redis"
    assert job.owns({**job.labels, "other": "x"})
    assert not job.owns({PROJECT_LABEL: "shop", BUILD_ID_LABEL: "41-3"})
    assert SECRET not in repr(job)


def test_the_job_masks_every_secret_the_settings_hold(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path,
        db_password=SECRET,
        registry_user="alice",
        registry_password=REGISTRY_SECRET,
        services="postgres,search",
        search_image="example/search:1",
        search_env="API_KEY=key-value-7,MODE=banana",
        test_env="SERVICE_TOKEN=tok-9",
    )
    job = Job.from_settings(settings, extra_secrets=["extra-value-3"])
    basic = base64.b64encode(b"alice:reg-pass-42").decode()
    text = " ".join([
        SECRET, quote(SECRET, safe=""), quote(SECRET), "reg-pass-42", basic,
        "key-value-7", "tok-9", "extra-value-3", "banana",
    ])
    assert job.mask(text) == " ".join([MASK] * 8 + ["banana"])


def test_the_public_default_password_is_not_masked_out_of_names(tmp_path: Path) -> None:
    job = Job.from_settings(settings_for(tmp_path, project="shop", build_id="7"))
    assert job.mask(job.container_name("postgres")) == "layerkeep-shop-7-postgres"


# --- on the real engine ----------------------------------------------------------------


@pytest.fixture
def job_engine(engine: Engine, tmp_path: Path) -> Iterator[Engine]:
    """The session engine working for a fresh job; its containers are removed after."""
    settings = settings_for(tmp_path, project="lktest-engine", build_id=uuid.uuid4().hex[:10])
    working = engine.for_job(Job.from_settings(settings))
    yield working
    job = working.job_for(settings)
    for container in working.list_containers(job.label_filter):
        working.remove_container(str(container["Id"]))


def sleeper(engine: Engine, name: str) -> str:
    container = engine.create_container(
        "debian:bookworm-slim", name=name, network="bridge", command=["sleep", "300"]
    )
    engine.start_container(container)
    return container


@pytest.mark.docker
def test_a_name_clash_is_one_line_naming_the_container(job_engine: Engine) -> None:
    assert job_engine.job is not None
    name = job_engine.job.container_name("clash")
    job_engine.create_container("debian:bookworm-slim", name=name, network="bridge")
    with pytest.raises(ResourceConflict) as caught:
        job_engine.create_container("debian:bookworm-slim", name=name, network="bridge")
    line = caught.value.one_line()
    assert "\n" not in line
    assert line.startswith(f"create container {name} failed: Conflict.")
    assert "LAYERKEEP_BUILD_ID" in caught.value.hint
    assert (caught.value.resource, caught.value.status) == (name, 409)
    assert isinstance(caught.value, LayerkeepError)


@pytest.mark.docker
def test_what_the_engine_creates_carries_the_job_and_session_labels(
    engine: Engine, job_engine: Engine
) -> None:
    assert job_engine.job is not None
    container = job_engine.create_container(
        "debian:bookworm-slim", name=job_engine.job.container_name("labels"), network="bridge"
    )
    attrs = job_engine.inspect_container(container)
    assert attrs is not None
    labels = attrs["Config"]["Labels"]
    assert labels.items() >= {**engine.labels, **job_engine.job.labels}.items()


@pytest.mark.docker
def test_exec_returns_exit_code_and_both_streams(job_engine: Engine) -> None:
    assert job_engine.job is not None
    name = job_engine.job.container_name("exec")
    sleeper(job_engine, name)
    result = job_engine.exec(
        name, ["sh", "-c", 'echo "out $VALUE"; echo err >&2; exit 3'],
        environment={"VALUE": "from-env"},
    )
    assert result.exit_code == 3
    # Two pipes in the container: the engine keeps no order between them.
    assert sorted(result.output.splitlines()) == ["err", "out from-env"]


@pytest.mark.docker
def test_a_hanging_exec_is_waited_for_only_as_long_as_asked(job_engine: Engine) -> None:
    assert job_engine.job is not None
    name = job_engine.job.container_name("hang")
    sleeper(job_engine, name)
    running = job_engine.start_exec(name, ["sh", "-c", "sleep 2; echo done"])
    started = time.monotonic()
    assert running.result(0.3) is None
    assert time.monotonic() - started < 1.0
    finished = running.result(30)
    assert finished is not None
    assert (finished.exit_code, finished.output) == (0, "done\n")


@pytest.mark.docker
def test_exec_in_a_stopped_or_missing_container_names_it(job_engine: Engine) -> None:
    assert job_engine.job is not None
    stopped = job_engine.job.container_name("stopped")
    job_engine.create_container("debian:bookworm-slim", name=stopped, network="bridge")
    with pytest.raises(ResourceConflict) as conflict:
        job_engine.exec(stopped, ["true"])
    assert conflict.value.one_line().startswith(f"run true in {stopped} failed: ")
    assert "is not running" in conflict.value.one_line()

    missing = job_engine.job.container_name("never-made")
    with pytest.raises(ResourceNotFound) as absent:
        job_engine.exec(missing, ["true"])
    assert absent.value.resource == missing
    assert absent.value.one_line() == (
        f"run true in {missing} failed: No such container: {missing}"
    )


@pytest.mark.docker
def test_removal_and_lookups_of_what_is_gone(job_engine: Engine) -> None:
    assert job_engine.job is not None
    name = job_engine.job.container_name("gone")
    container = job_engine.create_container("debian:bookworm-slim", name=name, network="bridge")
    assert job_engine.remove_container(container)
    assert not job_engine.remove_container(container)
    assert job_engine.inspect_container(name) is None
    assert job_engine.inspect_network(f"{name}-net") is None
    assert not job_engine.remove_network(f"{name}-net")
    assert job_engine.image_id("layerkeep-test/no-such-image:1") is None
    with pytest.raises(ResourceNotFound):
        job_engine.start_container(name)


@pytest.mark.docker
def test_an_engine_serves_only_its_own_job(job_engine: Engine, tmp_path: Path) -> None:
    other = settings_for(tmp_path, project="lktest-engine", build_id="someone-else")
    with pytest.raises(LayerkeepError) as caught:
        job_engine.job_for(other)
    assert "not for project lktest-engine build someone-else" in caught.value.one_line()


# --- figures while another job asks the engine too ----------------------------------------


@contextmanager
def disk_usage_asked_meanwhile(engine: Engine) -> Iterator[None]:
    """Another job's `docker system df`, over and over, while the block runs.

    Docker before 23 computes one disk-usage answer at a time and fails any query that
    comes meanwhile; Docker 23+ shares one answer among them, so nothing fails there.
    """
    version = str(engine.server_version().get("Version", "0"))
    if int(version.partition(".")[0]) >= 23:
        pytest.skip(f"Docker {version} answers concurrent disk-usage queries together")
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            subprocess.run(["docker", "system", "df"], capture_output=True, check=False)

    askers = [threading.Thread(target=ask, daemon=True) for _ in range(2)]
    for asker in askers:
        asker.start()
    try:
        yield
    finally:
        stop.set()
        for asker in askers:
            asker.join()


def until_unknown(
    figure: Callable[[], int | None], *, unknown: int = 1, tries: int = 200
) -> list[int | None]:
    """``figure``'s answers until ``unknown`` of them are None, or ``tries`` of them."""
    answers: list[int | None] = []
    while len(answers) < tries and answers.count(None) < unknown:
        answers.append(figure())
    return answers


@pytest.mark.docker
def test_disk_usage_while_another_job_asks_is_unknown_not_an_error(engine: Engine) -> None:
    with disk_usage_asked_meanwhile(engine):
        answers = until_unknown(engine.layers_size)  # a DockerOperationError fails the test
    # The engine really was busy at least once (only its refusal gives None).
    assert answers[-1] is None, f"never busy in {len(answers)} queries"
    assert all(isinstance(answer, int) and answer > 0 for answer in answers[:-1])


def tiny_image(engine: Engine, reference: str) -> str:
    """A one-file image tagged ``reference`` (content of its own); its id."""
    data = uuid.uuid4().hex.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo("marker")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))
    image_id = engine.import_image(iter([buffer.getvalue()]), reference=reference, changes=[])
    engine.tag_image(image_id, reference)
    return image_id


@pytest.mark.docker
def test_space_a_build_freed_while_another_job_asks_is_unknown(
    engine: Engine, unique_repository: str
) -> None:
    reference = f"{unique_repository}/app:latest"
    lines: list[str] = []

    def replace_and_remove() -> int | None:
        old = tiny_image(engine, reference)
        tiny_image(engine, reference)  # the build's new image takes the tag
        freed = remove_replaced(engine, [old], lines.append)
        assert engine.image_attrs(old) is None  # removed, whatever the figure says
        return freed

    with disk_usage_asked_meanwhile(engine):
        # A few times: the engine may be busy before the removal, or after it.
        answers = until_unknown(replace_and_remove, unknown=3, tries=100)

    assert answers.count(None) == 3, f"busy {answers.count(None)} times in {len(answers)} builds"
    assert lines[-1] == "1 replaced image(s) removed (freed: unknown, the engine was busy)"
