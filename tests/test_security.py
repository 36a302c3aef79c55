"""What another local user, a damaged cache or a careless setting must not achieve.

Each test puts the attack or the mistake in place for real (another user's folder, a
symlink, a manifest naming ``../``, a secret in a build arg) and checks that layerkeep
refuses it with one line, or never writes, reads or leaks what it must not.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard
from clean_env import clean_environ
from conftest import SESSION_LABEL, TEST_LABEL
from second_engine import SecondEngineUnavailable, ensure_docker26, second_engine, transfer_images

from layerkeep.building.builder import Builder, choose_builder
from layerkeep.building.image import build_image
from layerkeep.cache.backend import load_cache, save_cache
from layerkeep.cache.mount_folder import FORMAT as MOUNTS_FORMAT
from layerkeep.cache.mount_folder import MountStore
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CacheUnavailable, CorruptCache
from layerkeep.core import joblock
from layerkeep.core.engine import Engine, connect
from layerkeep.core.errors import ConfigError
from layerkeep.core.job import Job
from layerkeep.core.joblock import UnsafeLockFolder, hold_build_id
from layerkeep.core.settings import (
    BuildSecret,
    Settings,
    describe_settings,
    load_settings,
    secret_build_args,
)
from layerkeep.testrun.reports_folder import MANIFEST
from layerkeep.testrun.run import CaseCounts, run_tests

NOBODY = 65534
VICTIM_TEXT = "the victim's own content\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown to another user")


def victim(tmp_path: Path) -> Path:
    """A file of the test's own that a lock must never write."""
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def lock_name(build_id: str) -> str:
    # The very name a job would lock: what an attacker plants.
    return f"{joblock._key('e', 'p', build_id)}.lock"


# --- locks ------------------------------------------------------------------------------


@needs_root
def test_a_lock_folder_another_user_made_first_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    planted = tmp_path / "locks"
    planted.mkdir()
    (planted / lock_name("42")).symlink_to(target)
    os.chown(planted, NOBODY, NOBODY)
    planted.chmod(0o1777)

    with pytest.raises(UnsafeLockFolder, match=f"belongs to uid {NOBODY}") as refused:
        hold_build_id("e", "p", "42", configured=True, command="inv ci", folder=planted)

    assert str(planted) in refused.value.one_line()
    assert "\n" not in refused.value.one_line()
    assert target.read_text() == VICTIM_TEXT
    assert stat.S_IMODE(planted.stat().st_mode) == 0o1777  # not ours to change


def test_a_lock_folder_others_may_write_or_a_symlink_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    (open_folder / lock_name("42")).symlink_to(target)
    with pytest.raises(UnsafeLockFolder, match="may be written by others"):
        hold_build_id("e", "p", "42", configured=True, command="", folder=open_folder)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    linked = tmp_path / "linked"
    linked.symlink_to(elsewhere)
    with pytest.raises(UnsafeLockFolder, match="is a symlink"):
        hold_build_id("e", "p", "42", configured=True, command="", folder=linked)

    assert list(elsewhere.iterdir()) == []
    assert target.read_text() == VICTIM_TEXT


def test_a_symlink_in_the_lock_folder_is_not_followed(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = tmp_path / "locks"
    folder.mkdir(mode=0o700)
    (folder / lock_name("42")).symlink_to(target)

    with pytest.raises(UnsafeLockFolder, match="cannot be a lock file"):
        hold_build_id("e", "p", "42", configured=True, command="inv ci", folder=folder)

    assert target.read_text() == VICTIM_TEXT


def test_the_lock_folder_is_private_and_a_released_lock_leaves_no_file(tmp_path: Path) -> None:
    folder = tmp_path / "made" / "locks"
    lock = hold_build_id("e", "p", "42", configured=True, command="inv ci", folder=folder)
    info = folder.lstat()
    assert stat.S_ISDIR(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.geteuid()
    assert lock.path.read_text().startswith(f"pid {os.getpid()} (inv ci")

    lock.release()

    assert list(folder.iterdir()) == []


def test_a_lock_removed_between_open_and_flock_is_taken_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of removing lock files: a job that opened the file just before its holder
    removed it, and locks it just after, must not believe it holds the build id. That
    moment cannot be hit on demand, so the holder is released inside a wrapper around
    the real ``flock``, between the second job's open and its lock."""
    folder = tmp_path / "locks"
    first = hold_build_id("e", "p", "42", configured=True, command="first", folder=folder)
    real_flock = fcntl.flock

    def release_first_then_lock(handle: int, operation: int) -> None:
        if not first.handle.closed:
            first.release()
        real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", release_first_then_lock)
    second = hold_build_id("e", "p", "42", configured=True, command="second", folder=folder)
    monkeypatch.undo()
    try:
        assert first.handle.closed
        assert os.fstat(second.handle.fileno()).st_ino == second.path.stat().st_ino
        with pytest.raises(joblock.BuildIdInUse, match="second"):
            hold_build_id("e", "p", "42", configured=True, command="third", folder=folder)
    finally:
        second.release()
    assert list(folder.iterdir()) == []


RUN_PROJECT = """\
import os
from pathlib import Path

from invoke.collection import Collection

from layerkeep.tasks.graph import step


@step("work")
def work(c):
    locks = Path(os.environ["LOCKS"])
    seen = [path.read_text() for path in locks.iterdir()]
    Path(os.environ["SEEN"]).write_text("\\n".join(seen))
    return "done"


ns = Collection(work)
"""


def test_a_run_keeps_its_lock_in_the_private_folder_and_removes_it(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "tasks.py").write_text(RUN_PROJECT)
    temp = tmp_path / "tmp"
    temp.mkdir()
    locks = temp / f"layerkeep-locks-{os.geteuid()}"
    seen = tmp_path / "seen"

    done = subprocess.run(
        [sys.executable, "-m", "invoke", "work"], cwd=project, capture_output=True, text=True,
        env=clean_environ(TMPDIR=str(temp), LOCKS=str(locks), SEEN=str(seen)),
        check=False, timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert seen.read_text().startswith("pid ")  # the run's lock, while it ran
    assert "(" in seen.read_text()
    assert stat.S_IMODE(locks.lstat().st_mode) == 0o700
    assert list(locks.iterdir()) == []


@needs_root
def test_a_run_whose_lock_folder_another_user_made_stops_in_one_line(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "tasks.py").write_text(RUN_PROJECT)
    locks = tmp_path / f"layerkeep-locks-{os.geteuid()}"
    locks.mkdir()
    os.chown(locks, NOBODY, NOBODY)
    seen = tmp_path / "seen"

    done = subprocess.run(
        [sys.executable, "-m", "invoke", "work"], cwd=project, capture_output=True, text=True,
        env=clean_environ(TMPDIR=str(tmp_path), LOCKS=str(locks), SEEN=str(seen)),
        check=False, timeout=120,
    )

    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert f"lock folder {locks} belongs to uid {NOBODY}" in output
    assert "Traceback" not in output
    assert not seen.exists()


def test_the_cache_folders_lock_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    planted = tmp_path / "would-be-created"
    (cache / ".lock").symlink_to(planted)

    for write in (True, False):
        with (
            pytest.raises(CacheUnavailable, match=r"\.lock is a symlink"),
            CacheDir(cache).locked(write=write),
        ):
            pass

    assert not planted.exists()


# --- the reports folder -------------------------------------------------------------------

JUNIT = '<testsuite tests="2"><testcase name="a"/><testcase name="b"/></testsuite>'
# What a test run may leave: JUnit at the top and in a folder of its own, its uid, and a
# link into the host (which must not come out).
WRITES_REPORTS = (
    "id -u > /reports/uid.txt && mkdir /reports/sub"
    f" && echo '{JUNIT}' > /reports/junit.xml && cp /reports/junit.xml /reports/sub/"
    " && ln -s /etc/hostname /reports/link.xml"
)


def non_root_image(repository: str) -> str:
    """The python stand-in run as a uid the host does not know, as many images are."""
    image = f"{repository}/app:latest"
    subprocess.run(
        ["docker", "build", "-q", "-t", image, "-"], input="FROM python:3.11-slim\nUSER 10001\n",
        text=True, capture_output=True, check=True, timeout=120,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    return image


@pytest.mark.docker
def test_a_user_made_reports_folder_keeps_its_mode_and_gets_the_reports(
    engine: Engine, tmp_path: Path, unique_repository: str
) -> None:
    image = non_root_image(unique_repository)
    reports = tmp_path / "reports"
    reports.mkdir()
    reports.chmod(0o750)
    (reports / "mine.txt").write_text("the user's own file\n")
    settings = load_settings(
        tmp_path,
        {
            "LAYERKEEP_IMAGE": image, "LAYERKEEP_PROJECT": "security-test",
            "LAYERKEEP_BUILD_ID": uuid.uuid4().hex[:10], "LAYERKEEP_REPORTS_DIR": "reports",
            "LAYERKEEP_TEST_COMMAND": WRITES_REPORTS,
            "LAYERKEEP_COMMIT": "abc", "LAYERKEEP_BRANCH": "main",
        },
    )
    lines: list[str] = []

    done = run_tests(engine.for_job(Job.from_settings(settings)), settings, log=lines.append)

    assert done.exit_code == 0, lines
    assert stat.S_IMODE(reports.stat().st_mode) == 0o750
    assert (reports / "uid.txt").read_text() == "10001\n"
    assert done.reports == (reports / "junit.xml", reports / "sub" / "junit.xml")
    assert done.counts == CaseCounts(passed=4)
    assert "warning: link.xml is not a regular file; left out" in lines
    assert sorted(path.name for path in reports.iterdir()) == [
        MANIFEST, "junit.xml", "mine.txt", "sub", "uid.txt"
    ]
    assert (reports / "mine.txt").read_text() == "the user's own file\n"


MOVE_AS_USER = """
import sys
from pathlib import Path
from layerkeep.testrun.reports_folder import move_reports
lines = []
moved = move_reports(Path(sys.argv[1]), Path(sys.argv[2]), lines.append)
print("\\n".join(map(str, moved + lines)))
"""


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder other users can reach (the test's own tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="layerkeep-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@needs_root
def test_reports_in_a_folder_the_container_made_as_its_user_are_copied(
    shared_folder: Path,
) -> None:
    """A user who is not root may not move files out of a folder the container made as
    its own uid: such reports are copied, and become the user's (removable later). A
    folder the user cannot read is a warning, not a silent loss."""
    work = shared_folder / "work"
    outbox, reports = work / "outbox", work / "reports"
    (outbox / "sub").mkdir(parents=True)
    (outbox / "closed").mkdir(mode=0o700)
    reports.mkdir()
    (outbox / "top.xml").write_text(JUNIT)
    (outbox / "sub" / "junit.xml").write_text(JUNIT)
    for path in (work, outbox, reports):
        os.chown(path, NOBODY, NOBODY)
    outbox.chmod(0o777)
    for path in (outbox / "top.xml", outbox / "sub", outbox / "sub" / "junit.xml"):
        os.chown(path, 10001, 10001)
    os.chown(outbox / "closed", 10001, 10001)

    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", MOVE_AS_USER, str(outbox), str(reports)],
        capture_output=True, text=True, check=True, timeout=60,
    )

    assert done.stdout.splitlines() == [
        str(reports / "sub" / "junit.xml"),
        str(reports / "top.xml"),
        f"warning: reports in {outbox / 'closed'} not read: Permission denied",
    ]
    assert (reports / "sub" / "junit.xml").read_text() == JUNIT
    assert (reports / "sub" / "junit.xml").stat().st_uid == NOBODY  # copied: the user's
    assert (reports / "top.xml").stat().st_uid == 10001  # moved
    assert not (outbox / "top.xml").exists()


# --- build args and build secrets ---------------------------------------------------------


def project_settings(root: Path, **settings: str) -> Settings:
    return load_settings(
        root,
        {"LAYERKEEP_COMMIT": "abc", "LAYERKEEP_BRANCH": "main", "LAYERKEEP_PROJECT": "sec",
         **{f"LAYERKEEP_{key.upper()}": value for key, value in settings.items()}},
    )


@pytest.mark.parametrize(
    "name", ["DOCKER_CONFIG", "DOCKER_HOST", "PATH", "HOME", "BUILDX_BUILDER", "BUILDKIT_HOST",
             "LD_PRELOAD", "SSL_CERT_FILE"],
)
def test_a_build_arg_the_docker_cli_reads_itself_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError) as refused:
        project_settings(tmp_path, build_args=f"APP=1,{name}=/tmp/attacker-value")
    line = refused.value.one_line()
    assert f"build arg {name} would be set in the docker CLI's own environment" in line
    assert "LAYERKEEP_BUILD_ARGS" in line
    assert "attacker-value" not in line
    assert "\n" not in line


def test_buildkits_own_build_args_and_proxies_stay_allowed(tmp_path: Path) -> None:
    allowed = "BUILDKIT_SYNTAX=x,BUILDKIT_CONTEXT_KEEP_GIT_DIR=1,HTTP_PROXY=http://p:3128,APP=1"
    assert len(project_settings(tmp_path, build_args=allowed).build_args) == 4


def test_build_args_holding_secrets_are_named_by_name_or_by_masked_value(tmp_path: Path) -> None:
    password = uuid.uuid4().hex
    settings = project_settings(
        tmp_path, registry_password=password, secrets="LISTED",
        build_args=f"APP_URL={password},PLAIN=1,NPM_TOKEN=abc,LISTED=v,EMPTY_KEY=",
    )
    assert secret_build_args(settings) == ["APP_URL", "NPM_TOKEN", "LISTED"]


def test_build_secrets_are_masked_and_shown_by_name(tmp_path: Path) -> None:
    settings = load_settings(
        tmp_path,
        {"LAYERKEEP_COMMIT": "abc", "LAYERKEEP_BRANCH": "main",
         "LAYERKEEP_BUILD_SECRETS": "npm=NPM_AUTH,API", "NPM_AUTH": "value-one", "API": "two2"},
    )
    assert settings.build_secrets == (BuildSecret("npm", "NPM_AUTH"), BuildSecret("API", "API"))
    assert {"value-one", "two2"} <= set(settings.secret_values)
    shown = {row.name: row.value for row in describe_settings(settings)}
    assert shown["LAYERKEEP_BUILD_SECRETS"] == "npm=NPM_AUTH,API"
    with pytest.raises(ConfigError) as refused:
        project_settings(tmp_path, build_secrets="npm=")
    assert "LAYERKEEP_BUILD_SECRETS='npm='" in refused.value.one_line()
    assert "write VARIABLE or id=VARIABLE" in refused.value.one_line()


def test_a_run_with_docker_config_as_a_build_arg_stops_before_any_task(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "tasks.py").write_text(RUN_PROJECT)
    seen = tmp_path / "seen"

    done = subprocess.run(
        [sys.executable, "-m", "invoke", "work"], cwd=project, capture_output=True, text=True,
        env=clean_environ(
            TMPDIR=str(tmp_path), LOCKS=str(tmp_path / "locks"), SEEN=str(seen),
            LAYERKEEP_BUILD_ARGS="DOCKER_CONFIG=/tmp/elsewhere",
        ),
        check=False, timeout=120,
    )

    assert done.returncode == 2, done.stdout + done.stderr
    assert "build arg DOCKER_CONFIG would be set" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not seen.exists()  # the task never ran


DOCKERFILE_WITH_MOUNT = """\
FROM debian:bookworm-slim
ARG DEPLOY_TOKEN
COPY nonce.txt /nonce.txt
RUN --mount=type=secret,id=api_token sha256sum /run/secrets/api_token > /secret.sha256 \\
    && echo "control $DEPLOY_TOKEN" > /control.txt
"""
# Records its arguments, then runs the real CLI: what `ps` would have shown.
ARGV_RECORDER = """#!/bin/sh
printf '%s\\n' "$@" >> "{log}"
exec "{cli}" "$@"
"""


@pytest.fixture(scope="module")
def docker26_buildx(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Engine, dict[str, str]]]:
    """A throw-away Docker 26 engine whose CLI builds with buildx."""
    folder = tmp_path_factory.mktemp("security-26")
    try:
        with second_engine(folder, docker26=ensure_docker26()) as second:
            transfer_images(os.environ, second.environ, ["debian:bookworm-slim"])
            engine = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            yield engine, dict(second.environ)
            engine.close()
    except SecondEngineUnavailable as error:
        pytest.skip(f"no Docker 26 engine here: {error}")


def found_in_cache(folder: Path, value: bytes) -> list[str]:
    """The files of a cache folder holding ``value``, compressed blobs read decompressed."""
    holding = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".zst":
            data = zstandard.ZstdDecompressor().stream_reader(data).read()
        if value in data:
            holding.append(path.relative_to(folder).as_posix())
    return holding


def docker_text(environ: Mapping[str, str], *command: str) -> str:
    return subprocess.run(
        ["docker", *command], env=dict(environ), capture_output=True, text=True, check=True,
        timeout=120,
    ).stdout


@pytest.mark.docker
@pytest.mark.parametrize("cli", ["20.10", "26 buildx"])
def test_a_build_secret_is_readable_in_the_build_and_kept_nowhere(
    engine: Engine, tmp_path: Path, unique_repository: str, cli: str,
    request: pytest.FixtureRequest,
) -> None:
    if cli == "20.10":
        builder_engine, environ = engine, dict(os.environ)
        builder = Builder("buildkit", "/usr/bin/docker")
    else:
        builder_engine, environ = request.getfixturevalue("docker26_buildx")
        builder = choose_builder("buildkit", environ, engine=builder_engine)
    secret, control = f"s3cr3t-{uuid.uuid4().hex}", f"c0ntrol-{uuid.uuid4().hex}"
    argv = tmp_path / "argv.log"
    recorder = tmp_path / "docker"
    recorder.write_text(ARGV_RECORDER.format(log=argv, cli=builder.cli))
    recorder.chmod(0o755)
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(DOCKERFILE_WITH_MOUNT)
    (context / "nonce.txt").write_text(uuid.uuid4().hex)  # no other build's cache serves it
    image = f"{unique_repository}/app"
    settings = project_settings(
        tmp_path, image=image, context="context", cache_dir=str(tmp_path / "cache"),
        build_args=f"DEPLOY_TOKEN={control}", build_secrets="api_token=API_TOKEN",
    )
    lines: list[str] = []
    environ = {**environ, "API_TOKEN": secret}

    build_image(
        builder_engine, settings, replace(builder, cli=str(recorder)), environ, log=lines.append
    )
    save_cache(builder_engine, settings, builder, environ, log=lines.append)

    run = docker_text(environ, "run", "--rm", f"{image}:latest", "cat", "/secret.sha256")
    assert run.split()[0] == hashlib.sha256(secret.encode()).hexdigest()  # read in the build
    assert "--secret\nid=api_token,env=API_TOKEN\n" in argv.read_text()
    assert secret not in argv.read_text()
    assert not any(secret in line for line in lines)
    history = docker_text(environ, "history", "--no-trunc", f"{image}:latest")
    config = docker_text(environ, "image", "inspect", f"{image}:latest")
    assert secret not in history
    assert secret not in config
    assert found_in_cache(tmp_path / "cache", secret.encode()) == []
    # The build arg, on the other hand, is kept everywhere: what the warning says.
    assert control in history
    assert found_in_cache(tmp_path / "cache", control.encode()) != []
    assert any(
        line.startswith("warning: build arg DEPLOY_TOKEN holds a secret") for line in lines
    )
    if cli != "20.10":
        builder_engine.remove_image(f"{image}:latest", force=True)


@pytest.mark.docker
def test_build_secrets_stop_a_classic_build_or_one_whose_variable_is_unset(
    engine: Engine, tmp_path: Path, unique_repository: str
) -> None:
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm-slim\n")
    settings = project_settings(
        tmp_path, image=f"{unique_repository}/app", build_secrets="API_TOKEN"
    )
    with pytest.raises(ConfigError, match="the classic builder has no build secrets"):
        build_image(engine, settings, Builder("legacy"), {"API_TOKEN": "x"}, log=print)
    with pytest.raises(ConfigError, match="names API_TOKEN, not set in the environment"):
        build_image(
            engine, settings, Builder("buildkit", "/usr/bin/docker"), {"PATH": "/usr/bin"},
            log=print,
        )
    assert engine.image_id(f"{unique_repository}/app:latest") is None


@pytest.mark.docker
def test_the_docker_cli_never_gets_a_build_arg_that_changes_it(
    engine: Engine, tmp_path: Path, unique_repository: str
) -> None:
    """Settings made by hand skip the loader's check: the CLI call makes it again."""
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm-slim\n")
    ran = tmp_path / "ran"
    cli = tmp_path / "docker"
    cli.write_text(f"#!/bin/sh\ntouch {ran}\n")
    cli.chmod(0o755)
    settings = replace(
        project_settings(tmp_path, image=f"{unique_repository}/app"),
        build_args={"DOCKER_CONFIG": str(tmp_path)},
    )
    with pytest.raises(ConfigError, match="build arg DOCKER_CONFIG would be set"):
        build_image(engine, settings, Builder("buildkit", str(cli)), dict(os.environ), log=print)
    assert not ran.exists()


# --- what the cache folder names ---------------------------------------------------------


@pytest.mark.docker
@pytest.mark.parametrize("named", ["../outside", "absolute"])
def test_a_manifest_naming_blobs_outside_the_folder_is_a_damaged_cache(
    engine: Engine, tmp_path: Path, unique_repository: str, named: str
) -> None:
    """The blobs are moved out of the folder and the manifest names them there: were they
    read, the image would come back. It must not: the cache is ignored, with a warning."""
    (tmp_path / "Dockerfile").write_text("FROM debian:bookworm-slim\nCOPY nonce.txt /\n")
    (tmp_path / "nonce.txt").write_text(uuid.uuid4().hex)
    image = f"{unique_repository}/app:latest"
    settings = project_settings(tmp_path, image=image, cache_dir="cache", builder="legacy")
    builder = Builder("legacy")
    build_image(engine, settings, builder, dict(os.environ), log=lambda _: None)
    save_cache(engine, settings, builder, dict(os.environ), log=lambda _: None)
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    manifest = json.loads((cache / "manifest.json").read_text())
    for blob in manifest["blobs"].values():
        moved = (cache / blob["file"]).rename(outside / Path(blob["file"]).name)
        blob["file"] = f"../outside/{moved.name}" if named == "../outside" else str(moved)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    engine.remove_image(image, force=True)
    lines: list[str] = []

    load_cache(engine, settings, builder, log=lines.append)

    assert engine.image_id(image) is None
    warning = next(line for line in lines if line.startswith("warning: ignoring the cache"))
    assert "not blobs/<digest>.zst" in warning
    assert "Traceback" not in "\n".join(lines)


def test_a_mounts_index_naming_a_file_outside_the_folder_removes_nothing(tmp_path: Path) -> None:
    target = victim(tmp_path)
    store = MountStore(tmp_path / "cache")
    store.folder.mkdir(parents=True)
    digest = f"sha256:{hashlib.sha256(b'x').hexdigest()}"
    entry = {"id": "pip", "file": "../../victim.txt", "digest": digest, "size": 1, "saved": 0.0}
    (store.folder / "index.json").write_text(
        json.dumps({"format": MOUNTS_FORMAT, "mounts": {"pip,/root/.cache/pip": entry}})
    )

    with pytest.raises(CorruptCache, match="is not the archive of"):
        store.read_index()
    assert store.evict(0) == []

    assert target.read_text() == VICTIM_TEXT


# --- the dockerd layerkeep starts ----------------------------------------------------------

# Records the environment it was started with, as the kernel holds it, then fails.
FAKE_DOCKERD = """#!/bin/sh
cat /proc/$$/environ > "{record}"
exit 3
"""
START = """
import os, sys
from pathlib import Path
from layerkeep.core.engine_start import ensure_engine
from layerkeep.core.errors import EngineUnavailable
try:
    ensure_engine(os.environ, log_path=Path(sys.argv[1]), timeout=30)
except EngineUnavailable as error:
    print(error.one_line())
"""
needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare"
)


def start_dockerd_alone(tmp_path: Path, environ: Mapping[str, str], log: Path) -> str:
    """Run layerkeep's engine start where no engine answers: a mount namespace of its own
    whose /run is empty (the main engine, which other tests use, keeps running)."""
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs none /run && exec "$0" -c "$1" "$2"',
         sys.executable, START, str(log)],
        env=dict(environ), capture_output=True, text=True, check=True, timeout=90,
    )
    return done.stdout + done.stderr


@needs_unshare
def test_dockerd_is_started_with_only_what_it_reads_of_the_environment(tmp_path: Path) -> None:
    """A dockerd started for real would have to replace the main engine on its socket,
    and its environment holds nothing that shows the fault: a fake dockerd first on PATH
    records the environment layerkeep's start function gave it (/proc/<pid>/environ)."""
    record = tmp_path / "environ"
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    (bin_folder / "dockerd").write_text(FAKE_DOCKERD.format(record=record))
    (bin_folder / "dockerd").chmod(0o755)
    password, token = f"pw-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    environ = {
        "PATH": f"{bin_folder}:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LAYERKEEP_REGISTRY_PASSWORD": password,
        "LAYERKEEP_IMAGE": "myorg/app",
        "GITHUB_TOKEN": token,
        "HTTPS_PROXY": "http://proxy.example:3128",
        "DOCKER_RAMDISK": "true",
    }

    said = start_dockerd_alone(tmp_path, environ, tmp_path / "dockerd.log")

    assert said.strip().startswith("dockerd exited with status 3 before answering"), said
    started = dict(
        item.split("=", 1) for item in record.read_text().split("\0") if "=" in item
    )
    assert started == {
        "PATH": environ["PATH"],
        "HTTPS_PROXY": "http://proxy.example:3128",
        "DOCKER_RAMDISK": "true",
    }
    assert password not in record.read_text()
    assert token not in record.read_text()


@needs_unshare
def test_dockerds_log_is_never_written_through_a_symlink(tmp_path: Path) -> None:
    target = victim(tmp_path)
    log = tmp_path / "dockerd.log"
    log.symlink_to(target)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "dockerd").write_text(FAKE_DOCKERD.format(record=tmp_path / "env"))
    (tmp_path / "bin" / "dockerd").chmod(0o755)

    said = start_dockerd_alone(tmp_path, {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}, log)

    assert said.strip() == (
        f"cannot write dockerd's log {log}: Too many levels of symbolic links (remove it)"
    )
    assert not (tmp_path / "env").exists()  # never started
    assert target.read_text() == VICTIM_TEXT

    log.unlink()
    log.write_text("another user's file\n")
    os.chown(log, NOBODY, NOBODY)
    said = start_dockerd_alone(tmp_path, {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}, log)
    assert said.strip() == (
        f"dockerd's log {log} belongs to uid {NOBODY}; not starting dockerd with it (remove it)"
    )
    assert log.read_text() == "another user's file\n"
    assert not (tmp_path / "env").exists()
