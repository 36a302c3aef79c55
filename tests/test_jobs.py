"""db.init and test.run on the real engine, with real postgres and redis containers."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from clean_env import clean_environ

from layerkeep.core.engine import Engine
from layerkeep.core.errors import CommandFailed, ConfigError
from layerkeep.core.job import BUILD_ID_LABEL, Job
from layerkeep.core.secrets import MASK as REDACTED
from layerkeep.core.settings import Settings, load_settings
from layerkeep.services.containers import services_down, services_up
from layerkeep.testrun.database import init_database
from layerkeep.testrun.run import run_tests

pytestmark = pytest.mark.docker
PASSWORD = "Sup3r-s3cret-pw"  # noqa: S105 - a throwaway test database password


def job_settings(root: Path, image: str, **environ: str) -> Settings:
    return load_settings(
        root,
        {
            "LAYERKEEP_IMAGE": image,
            "LAYERKEEP_PROJECT": "jobs-test",
            "LAYERKEEP_BUILD_ID": uuid.uuid4().hex[:10],
            "LAYERKEEP_SERVICES": "postgres,redis",
            "LAYERKEEP_DB_PASSWORD": PASSWORD,
            **environ,
        },
    )


def job_engine(engine: Engine, settings: Settings) -> Engine:
    return engine.for_job(Job.from_settings(settings))


@pytest.fixture
def app_image(engine: Engine, unique_repository: str) -> str:
    """The python stand-in under an app name: enough to run shell and python commands."""
    engine.tag_image("python:3.11-slim", f"{unique_repository}/app:latest")
    return f"{unique_repository}/app"


def psql(engine: Engine, settings: Settings, sql: str, database: str) -> str:
    container = Job.from_settings(settings).container_name("postgres")
    command = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", database, "-tAc", sql]
    return engine.exec(container, command, environment={"PGPASSWORD": PASSWORD}).output.strip()


def test_db_init_creates_runs_sql_and_command_idempotently(
    engine: Engine, tmp_path: Path, app_image: str
) -> None:
    (tmp_path / "schema.sql").write_text(
        "CREATE TABLE IF NOT EXISTS links (code text PRIMARY KEY);\n"
        "INSERT INTO links VALUES ('abc') ON CONFLICT DO NOTHING;\n"
    )
    settings = job_settings(
        tmp_path,
        app_image,
        # Start postgres without the database, so db.init has to create it.
        LAYERKEEP_POSTGRES_ENV="POSTGRES_DB=postgres",
        LAYERKEEP_DB_NAME="orders_test",
        LAYERKEEP_DB_INIT_SQL="schema.sql",
        LAYERKEEP_DB_INIT_COMMAND='test "$DATABASE_URL" != "" && echo "init saw $DATABASE_URL"',
    )
    job = job_engine(engine, settings)
    lines: list[str] = []
    try:
        services_up(job, settings, log=lines.append)
        first = init_database(job, settings, log=lines.append)
        second = init_database(job, settings, log=lines.append)
        count = psql(job, settings, "SELECT count(*) FROM links", "orders_test")
    finally:
        services_down(job, settings, log=lines.append)
    assert first.created
    assert not second.created
    assert (first.sql_files, first.command_ran) == (1, True)
    assert count == "1"
    seen = f"init saw postgresql://postgres:{REDACTED}@postgres:5432/orders_test"
    assert seen in lines
    assert not any(PASSWORD in line for line in lines)


def test_db_init_command_failure_is_its_exit_code(
    engine: Engine, tmp_path: Path, app_image: str
) -> None:
    settings = job_settings(tmp_path, app_image, LAYERKEEP_DB_INIT_COMMAND="exit 4")
    job = job_engine(engine, settings)
    try:
        services_up(job, settings, log=lambda _: None)
        with pytest.raises(CommandFailed) as caught:
            init_database(job, settings, log=lambda _: None)
    finally:
        services_down(job, settings, log=lambda _: None)
    assert caught.value.exit_code == 4


def test_db_init_without_postgres_says_so(tmp_path: Path, app_image: str, engine: Engine) -> None:
    settings = job_settings(tmp_path, app_image, LAYERKEEP_SERVICES="redis")
    with pytest.raises(ConfigError, match="LAYERKEEP_DB_SERVICE='postgres' is not a postgres"):
        init_database(engine, settings, log=lambda _: None)


def test_run_tests_environment_mounts_setup_and_exit_code(
    engine: Engine, tmp_path: Path, app_image: str
) -> None:
    (tmp_path / "checks").mkdir()
    (tmp_path / "checks" / "expected.txt").write_text("mounted\n")
    script = (
        'cat /checks/expected.txt > /reports/mount.txt; cat /tmp/setup-ran > /reports/setup.txt; '
        'env | sort > /reports/env.txt; echo "url is $DATABASE_URL"; '
        'printf "<testsuite/>" > /reports/junit.xml; exit 5'
    )
    settings = job_settings(
        tmp_path,
        app_image,
        LAYERKEEP_TEST_COMMAND=script,
        LAYERKEEP_TEST_SETUP="echo from-setup > /tmp/setup-ran",
        LAYERKEEP_TEST_MOUNTS="checks:/checks:ro",
        LAYERKEEP_TEST_ENV=(
            "DATABASE_URL={postgres.url},POSTGRES_HOST={postgres.host},"
            "POSTGRES_PORT={postgres.port},REDIS_BROKER_HOST={redis.host},DEBUG=0"
        ),
        LAYERKEEP_REPORTS_DIR="out",
    )
    job = job_engine(engine, settings)
    lines: list[str] = []
    try:
        services_up(job, settings, log=lines.append)
        result = run_tests(job, settings, log=lines.append)
    finally:
        services_down(job, settings, log=lines.append)
    reports = tmp_path / "out"
    assert result.exit_code == 5
    assert not result.passed
    assert result.reports == (reports / "junit.xml",)
    assert (reports / "mount.txt").read_text() == "mounted\n"
    assert (reports / "setup.txt").read_text() == "from-setup\n"
    env = dict(
        line.split("=", 1) for line in (reports / "env.txt").read_text().splitlines() if "=" in line
    )
    assert env["POSTGRES_HOST"] == "postgres"
    assert env["POSTGRES_PORT"] == "5432"
    assert env["REDIS_BROKER_HOST"] == "redis"
    assert env["DEBUG"] == "0"
    assert env["DATABASE_URL"] == f"postgresql://postgres:{PASSWORD}@postgres:5432/app_test"
    assert f"url is postgresql://postgres:{REDACTED}@postgres:5432/app_test" in lines
    assert not any(PASSWORD in line for line in lines)


def test_failing_setup_stops_before_the_tests(
    engine: Engine, tmp_path: Path, app_image: str
) -> None:
    settings = job_settings(
        tmp_path,
        app_image,
        LAYERKEEP_SERVICES="",
        LAYERKEEP_TEST_SETUP="exit 3",
        LAYERKEEP_TEST_COMMAND="touch /reports/ran",
    )
    result = run_tests(job_engine(engine, settings), settings, log=lambda _: None)
    assert result.exit_code == 3
    assert not (settings.reports_dir / "ran").exists()


def test_missing_app_image_says_build_first(engine: Engine, tmp_path: Path) -> None:
    settings = job_settings(tmp_path, "layerkeep-test/never-built", LAYERKEEP_SERVICES="")
    with pytest.raises(ConfigError) as caught:
        run_tests(job_engine(engine, settings), settings, log=lambda _: None)
    assert caught.value.one_line() == (
        "the app image layerkeep-test/never-built:latest is not in the engine "
        "(run `inv image.build` first)"
    )


@pytest.mark.parametrize("keep", [False, True])
def test_test_run_task_cleans_up_even_when_tests_fail(
    engine: Engine, tmp_path: Path, app_image: str, keep: bool
) -> None:
    build_id = uuid.uuid4().hex[:10]
    (tmp_path / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    # The graph builds the image first: a one-step Dockerfile on the app image.
    (tmp_path / "Dockerfile").write_text(f"FROM {app_image}\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "app"], check=True)
    env = clean_environ(
        LAYERKEEP_IMAGE=app_image,
        LAYERKEEP_BUILD_ID=build_id,
        LAYERKEEP_SERVICES="postgres,redis",
        LAYERKEEP_TEST_COMMAND="echo failing; exit 2",
        LAYERKEEP_CACHE_DIR=str(tmp_path.parent / f"{tmp_path.name}-cache"),
        LAYERKEEP_REPORTS_DIR=str(tmp_path.parent / f"{tmp_path.name}-reports"),
    )
    args = [sys.executable, "-m", "invoke", "test.run"] + (["--keep-services"] if keep else [])
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    selector = [f"{BUILD_ID_LABEL}={build_id}"]
    try:
        assert done.returncode == 2, done.stdout + done.stderr
        assert "layerkeep: test.run: tests failed (exit 2)" in done.stderr
        left = engine.list_containers(selector)
        assert len(left) == (2 if keep else 0)
    finally:
        down = subprocess.run(
            [sys.executable, "-m", "invoke", "services.down"],
            cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
        )
    assert down.returncode == 0
    assert engine.list_containers(selector) == []
