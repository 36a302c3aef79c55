"""Preflight: what the settings and files already tell, found before anything starts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from clean_env import clean_environ
from gitrepos import Scripted

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError
from layerkeep.core.job import BUILD_ID_LABEL
from layerkeep.core.settings import Settings, load_settings
from layerkeep.preflight import (
    buildkit_features,
    check_before_start,
    needs_preflight,
    preflight,
    preflight_warnings,
)

INV = [sys.executable, "-m", "invoke"]
TEST_RUN = {"git.touch", "cache.load", "image.build", "services.up", "db.init", "test.run"}
BUILDKIT_ONLY = """\
FROM python:3.11-slim AS builder
COPY requirements.txt /tmp/
RUN --mount=type=cache,target=/root/.cache/pip mkdir /venv && cp /tmp/requirements.txt /venv/
FROM python:3.11-slim
COPY --from=builder /venv /venv
"""


def project(root: Path, dockerfile: str = "FROM python:3.11-slim\n", **environ: str) -> Settings:
    root.mkdir(parents=True, exist_ok=True)
    (root / "Dockerfile").write_text(dockerfile)
    fixed = {"LAYERKEEP_IMAGE": "app", "LAYERKEEP_COMMIT": "abc", "LAYERKEEP_BRANCH": "main"}
    return load_settings(root, {**fixed, **environ})


def test_a_sound_project_has_no_problems(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "conftest.py").write_text("")
    settings = project(
        tmp_path,
        LAYERKEEP_SERVICES="postgres,redis",
        LAYERKEEP_TEST_MOUNTS="tests:/app/tests:ro,conftest.py:/app/conftest.py",
        LAYERKEEP_DB_INIT_COMMAND="python -m migrate",
    )
    assert preflight(settings, TEST_RUN, os.environ) == []


def test_each_missing_mount_source_is_named(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    settings = project(tmp_path, LAYERKEEP_TEST_MOUNTS="tests:/app/tests,tset:/t,a.ini:/a.ini")
    problems = preflight(settings, TEST_RUN, os.environ)
    assert problems == [
        f"LAYERKEEP_TEST_MOUNTS: {tmp_path / name} (for {target}) does not exist: paths are "
        f"relative to the project folder {tmp_path}"
        for name, target in (("tset", "/t"), ("a.ini", "/a.ini"))
    ]
    # Only test.run mounts them: a build alone is not stopped.
    assert preflight(settings, {"image.build"}, os.environ) == []


def test_a_build_secret_whose_variable_is_unset_stops_before_anything_starts(
    tmp_path: Path,
) -> None:
    settings = project(tmp_path, LAYERKEEP_BUILD_SECRETS="npm=NPM_AUTH,API_TOKEN")
    problems = preflight(settings, {"image.build"}, {"API_TOKEN": "set"})
    assert problems == [
        "LAYERKEEP_BUILD_SECRETS names NPM_AUTH, not set in the environment: set it (your "
        "CI's secrets) or leave it out of LAYERKEEP_BUILD_SECRETS"
    ]
    assert preflight(settings, {"image.build"}, {"API_TOKEN": "a", "NPM_AUTH": "b"}) == []
    assert preflight(settings, {"services.up"}, {}) == []  # no build, no secret needed


def test_a_split_that_cannot_work_stops_test_run_before_it_starts(tmp_path: Path) -> None:
    nodes = project(tmp_path, LAYERKEEP_TEST_NODES="2")
    assert preflight(nodes, TEST_RUN, os.environ) == [
        "LAYERKEEP_TEST_NODES=2 needs LAYERKEEP_TEST_FILES, the files to split (e.g. "
        "LAYERKEEP_TEST_FILES=tests/**/test_*.py, globs relative to the project)"
    ]
    unmatched = project(tmp_path, LAYERKEEP_TEST_FILES="spec/*.py")
    assert preflight(unmatched, TEST_RUN, os.environ) == [
        f"LAYERKEEP_TEST_FILES=spec/*.py matches no file in {tmp_path} (globs are relative "
        "to the project folder, e.g. tests/**/test_*.py)"
    ]
    assert preflight(nodes, {"image.build"}, os.environ) == []


def test_buildkit_only_dockerfile_with_the_legacy_builder(tmp_path: Path) -> None:
    settings = project(tmp_path, BUILDKIT_ONLY, LAYERKEEP_BUILDER="legacy")
    [problem] = preflight(settings, {"image.build"}, os.environ)
    assert problem == (
        "LAYERKEEP_BUILDER=legacy (from environment) cannot build it: Dockerfile uses "
        "`RUN --mount`, which only BuildKit runs: set LAYERKEEP_BUILDER=auto or buildkit"
    )
    # `inv image.build --builder buildkit` may still fix it: left to the task.
    assert preflight(settings, {"image.build"}, os.environ, flags={"builder"}) == []


def test_buildkit_only_dockerfile_with_auto_and_no_buildkit_cli(tmp_path: Path) -> None:
    settings = project(tmp_path, BUILDKIT_ONLY, LAYERKEEP_DOCKER_CLI=str(tmp_path / "no-docker"))
    [problem] = preflight(settings, {"image.build"}, os.environ)
    assert "LAYERKEEP_BUILDER=auto found no docker CLI here that can use BuildKit" in problem
    assert "install docker-buildx" in problem


def test_auto_with_a_buildkit_cli_is_fine(tmp_path: Path) -> None:
    # /usr/bin/docker is the 20.10 CLI, which builds with BuildKit itself.
    assert Path("/usr/bin/docker").exists()
    settings = project(tmp_path, BUILDKIT_ONLY)
    assert preflight(settings, {"image.build"}, os.environ) == []


@pytest.mark.parametrize(
    ("dockerfile", "found"),
    [
        ("FROM a\nRUN --mount=type=secret,id=x cat /run/secrets/x\n", ["`RUN --mount`"]),
        ("FROM a\nRUN --network=none true\n", ["`RUN --network`"]),
        ("FROM a\nCOPY --link . /app\n", ["`COPY --link`"]),
        ("FROM a\nCOPY --chown=1:1 --chmod=644 a /a\n", ["`COPY --chmod`"]),
        ("FROM a\nADD --checksum=sha256:00 https://x/y /y\n", ["`ADD --checksum`"]),
        ("FROM a\nRUN <<EOF\necho hi\nEOF\n", ["a heredoc (`RUN <<EOF`)"]),
        ("FROM a\nCOPY <<-'EOT' /etc/x\nhi\nEOT\n", ["a heredoc (`COPY <<-'EOT' /etc/x`)"]),
        ("# syntax=example.com/fe:1\nFROM a\n", ["the frontend `# syntax=example.com/fe:1`"]),
        ("FROM a\nRUN \\\n  --mount=type=cache,target=/c \\\n  make\n", ["`RUN --mount`"]),
        # What the classic builder runs as well:
        ("# syntax=docker/dockerfile:1.4\nFROM a\nRUN echo --mount\n", []),
        ("FROM a\nCOPY --chown=app:app --from=b /x /x\nRUN cat <<<hi\n", []),
        ("FROM a\n# RUN --mount=type=cache,target=/c make\nRUN make\n", []),
    ],
)
def test_buildkit_features(dockerfile: str, found: list[str]) -> None:
    assert buildkit_features(dockerfile) == found


def test_missing_image_context_and_dockerfile(tmp_path: Path) -> None:
    settings = project(tmp_path, LAYERKEEP_IMAGE="", LAYERKEEP_DOCKERFILE="docker/Dockerfile")
    problems = preflight(settings, {"image.build", "test.run"}, os.environ)
    assert problems[0].startswith("LAYERKEEP_IMAGE is not set: set it in layerkeep.env")
    assert problems[1].startswith(
        f"LAYERKEEP_DOCKERFILE: cannot read {tmp_path / 'docker' / 'Dockerfile'} "
        "(No such file or directory)"
    )
    assert preflight(settings, {"services.up"}, os.environ) == []
    gone = project(tmp_path, LAYERKEEP_CONTEXT="src")
    assert preflight(gone, {"image.build"}, os.environ) == [
        f"LAYERKEEP_CONTEXT: build context {tmp_path / 'src'} is not a folder: set "
        "LAYERKEEP_CONTEXT to the folder holding your sources (relative to the project)"
    ]


def test_database_settings_without_a_postgres_service(tmp_path: Path) -> None:
    lonely = project(tmp_path, LAYERKEEP_SERVICES="redis", LAYERKEEP_DB_INIT_COMMAND="migrate")
    [problem] = preflight(lonely, {"db.init"}, os.environ)
    assert problem.startswith(
        "LAYERKEEP_DB_INIT_COMMAND is set but LAYERKEEP_SERVICES has no 'postgres'"
    )
    # Nothing to initialise: db.init skips itself, rightly.
    assert preflight(project(tmp_path, LAYERKEEP_SERVICES="redis"), {"db.init"}, os.environ) == []
    wrong = project(tmp_path, LAYERKEEP_SERVICES="redis", LAYERKEEP_DB_SERVICE="redis")
    assert preflight(wrong, {"db.init"}, os.environ) == [
        "LAYERKEEP_DB_SERVICE='redis' is a redis service, not postgres: set "
        "LAYERKEEP_DB_SERVICE to your postgres service"
    ]
    sql = project(tmp_path, LAYERKEEP_SERVICES="postgres", LAYERKEEP_DB_INIT_SQL="db/schema.sql")
    assert preflight(sql, {"db.init"}, os.environ)[0].startswith(
        f"LAYERKEEP_DB_INIT_SQL: {tmp_path / 'db' / 'schema.sql'} does not exist"
    )


def test_layerkeep_outputs_as_the_build_context(tmp_path: Path) -> None:
    settings = project(tmp_path, LAYERKEEP_REPORTS_DIR=".")
    [problem] = preflight(settings, {"image.build"}, os.environ)
    assert problem.startswith(f"LAYERKEEP_REPORTS_DIR={tmp_path} is the build context")


def test_check_before_start_logs_each_and_raises_one_line(tmp_path: Path) -> None:
    settings = project(tmp_path, LAYERKEEP_IMAGE="", LAYERKEEP_TEST_MOUNTS="gone:/gone")
    logged: list[str] = []
    with pytest.raises(ConfigError) as caught:
        check_before_start(settings, TEST_RUN, os.environ, log=logged.append)
    assert len(logged) == 2
    assert all(line.startswith("preflight: ") for line in logged)
    assert caught.value.one_line() == (
        "nothing was started: LAYERKEEP_IMAGE is not set: set it in layerkeep.env, e.g. "
        "LAYERKEEP_IMAGE=myorg/app (or pass --image to image.build) (and 1 more, listed above)"
    )
    check_before_start(project(tmp_path), TEST_RUN, os.environ, log=logged.append)
    assert len(logged) == 2


GIT_COSTS = (
    ": every commit changes .git, so a `COPY .` misses the cache on every build, and each "
    "build sends it to the builder: "
)


def git_project(root: Path, **environ: str) -> Settings:
    """A project in a real git repository, one commit in, with no ignore file."""
    repo = Scripted(root)
    repo.write("Dockerfile", "FROM python:3.11-slim\nCOPY . /app\n")
    repo.write("src/app.py", "print('hi')\n")
    repo.commit("first", when=1_700_000_000)
    return project(root, "FROM python:3.11-slim\nCOPY . /app\n", **environ)


def test_git_sent_to_the_builder_is_a_warning_with_its_cost_and_fix(tmp_path: Path) -> None:
    settings = git_project(tmp_path)

    [warning] = preflight_warnings(settings, {"image.build"}, os.environ)

    assert re.fullmatch(r"the build context holds \.git \(\d+\.\d MB\) and .*", warning)
    assert warning.endswith(
        f"there is no .dockerignore to leave it out{GIT_COSTS}create .dockerignore with the "
        "line `.git`"
    )
    assert preflight(settings, {"image.build"}, os.environ) == []  # it never stops a run
    assert preflight_warnings(settings, {"services.up", "test.run"}, os.environ) == []
    logged: list[str] = []
    check_before_start(settings, {"image.build"}, os.environ, log=logged.append)
    assert logged == [f"preflight: warning: {warning}"]

    (tmp_path / ".dockerignore").write_text("*.log\n.git/objects\n")
    [warning] = preflight_warnings(settings, {"image.build"}, os.environ)
    assert warning.endswith(
        f".dockerignore does not leave it out{GIT_COSTS}add the line `.git` to .dockerignore"
    )


@pytest.mark.parametrize(
    "rules", [".git", ".git/", "/.git", "**/.git", ".*", "*\n!src\n!Dockerfile", ".git/*"]
)
def test_an_ignore_rule_that_leaves_git_out_silences_it(tmp_path: Path, rules: str) -> None:
    settings = git_project(tmp_path)
    (tmp_path / ".dockerignore").write_text(f"# ours\n{rules}\n")
    assert preflight_warnings(settings, {"image.build"}, os.environ) == []


@pytest.mark.parametrize(
    ("builder", "context_rules", "own_rules", "warns_about"),
    [
        # BuildKit reads Dockerfile.dockerignore instead of .dockerignore.
        ("buildkit", "*.log", ".git", None),
        ("buildkit", ".git", "*.log", "Dockerfile.dockerignore"),
        # The classic builder reads only .dockerignore.
        ("legacy", "*.log", ".git", ".dockerignore"),
        ("legacy", ".git", "*.log", None),
        # auto: /usr/bin/docker (20.10) builds with BuildKit here.
        ("auto", "*.log", ".git", None),
        ("auto", ".git", "*.log", "Dockerfile.dockerignore"),
    ],
)
def test_the_ignore_file_the_builder_reads_decides(
    tmp_path: Path, builder: str, context_rules: str, own_rules: str, warns_about: str | None
) -> None:
    assert Path("/usr/bin/docker").exists()
    settings = git_project(tmp_path, LAYERKEEP_BUILDER=builder)
    (tmp_path / ".dockerignore").write_text(f"{context_rules}\n")
    (tmp_path / "Dockerfile.dockerignore").write_text(f"{own_rules}\n")
    warnings = preflight_warnings(settings, {"image.build"}, os.environ)
    if warns_about is None:
        assert warnings == []
    else:
        [warning] = warnings
        assert warning.endswith(f"add the line `.git` to {warns_about}")


def test_only_runs_with_checked_tasks_need_it() -> None:
    assert needs_preflight(TEST_RUN)
    assert not needs_preflight({"settings"})
    assert not needs_preflight({"services.sweep", "services.down", "standins.build"})


# --- on the real engine: the run stops before anything starts ----------------------------


def inv_project(root: Path, settings: str) -> None:
    root.mkdir()
    (root / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    (root / "layerkeep.env").write_text(settings)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "project"], check=True)


def inv(root: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*INV, *args],
        cwd=root,
        env=clean_environ(**extra),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.mark.docker
def test_a_wrong_mount_stops_test_run_before_any_service_starts(
    tmp_path: Path, engine: Engine, unique_repository: str
) -> None:
    root = tmp_path / "project"
    build_id = f"t{uuid.uuid4().hex[:8]}"
    inv_project(
        root,
        f"LAYERKEEP_IMAGE={unique_repository}/app\n"
        "LAYERKEEP_SERVICES=postgres,redis\n"
        "LAYERKEEP_TEST_MOUNTS=tset:/app/tests:ro\n",
    )
    (root / "Dockerfile").write_text("FROM python:3.11-slim\n")

    done = inv(root, "test.run", LAYERKEEP_BUILD_ID=build_id)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (
        f"layerkeep: nothing was started: LAYERKEEP_TEST_MOUNTS: {root / 'tset'} (for "
        f"/app/tests) does not exist: paths are relative to the project folder {root}\n"
    )
    assert "==>" not in done.stdout  # no task started
    assert engine.list_containers([f"{BUILD_ID_LABEL}={build_id}"]) == []
    assert engine.list_networks([f"{BUILD_ID_LABEL}={build_id}"]) == []
    assert engine.image_id(f"{unique_repository}/app") is None


@pytest.mark.docker
def test_run_mount_with_the_legacy_builder_stops_before_building(
    tmp_path: Path, engine: Engine, unique_repository: str
) -> None:
    root = tmp_path / "project"
    inv_project(root, f"LAYERKEEP_IMAGE={unique_repository}/app\nLAYERKEEP_BUILDER=legacy\n")
    (root / "Dockerfile").write_text(BUILDKIT_ONLY)
    (root / "requirements.txt").write_text("")

    done = inv(root, "ci", LAYERKEEP_BUILD_ID=f"t{uuid.uuid4().hex[:8]}")

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(
        f"layerkeep: nothing was started: LAYERKEEP_BUILDER=legacy (from {root}/layerkeep.env:2) "
        "cannot build it: Dockerfile uses `RUN --mount`"
    )
    assert done.stderr.rstrip().endswith("set LAYERKEEP_BUILDER=auto or buildkit")
    assert "==>" not in done.stdout
    assert engine.image_id(f"{unique_repository}/app") is None
    assert engine.image_id(f"{unique_repository}/app:latest-stage-builder") is None
    # The same project builds once the builder may use BuildKit.
    done = inv(root, "image.build", "--builder", "buildkit")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert engine.image_id(f"{unique_repository}/app") is not None
    # It has no .dockerignore: a warning, and the build went on.
    assert "preflight: warning: the build context holds .git" in done.stdout
