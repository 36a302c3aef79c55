"""db.init: create the test database if missing, then run the project's initialisation."""

from __future__ import annotations

import io
import re
import tarfile
import time
from dataclasses import dataclass

from layerkeep.core.engine import Engine
from layerkeep.core.errors import CommandFailed, ConfigError, DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.service_specs import ServiceSpec
from layerkeep.core.settings import Settings
from layerkeep.services.readiness import ServiceWait, wait_ready
from layerkeep.testrun.app_container import mounts_for, run_in_app_image
from layerkeep.testrun.nodes import local_node_settings

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_SQL_FOLDER = "/layerkeep-sql"


@dataclass(frozen=True)
class DbReport:
    """What db.init did."""

    created: bool
    sql_files: int
    command_ran: bool
    seconds: float
    database: str = ""


def database_service(settings: Settings) -> ServiceSpec:
    """The postgres service db.init prepares; a one-line error when there is none."""
    for service in settings.services:
        if service.name == settings.db_service:
            if service.kind != "postgres":
                break
            return service
    raise ConfigError(
        f"LAYERKEEP_DB_SERVICE={settings.db_service!r} is not a postgres service",
        key="LAYERKEEP_DB_SERVICE",
        hint="add postgres to LAYERKEEP_SERVICES or name your postgres service",
    )


def init_database(
    engine: Engine, settings: Settings, *, log: Log = print, node: int = 1
) -> DbReport:
    """Wait for postgres, create LAYERKEEP_DB_NAME if missing, run SQL files and command.

    ``node`` is the local test node whose environment the command gets.
    """
    started = time.monotonic()
    service = database_service(settings)
    for name, value in (("LAYERKEEP_DB_NAME", settings.db_name),
                        ("LAYERKEEP_DB_USER", settings.db_user)):
        if not _IDENTIFIER.match(value):
            raise ConfigError(
                f"{name}={value!r} is not a plain SQL identifier",
                key=name,
                hint="use letters, digits and _, starting with a letter",
            )
    for path in settings.db_init_sql:
        if not path.is_file():
            raise ConfigError(f"SQL file {path} not found", key="LAYERKEEP_DB_INIT_SQL")
    container = _wait_for_postgres(engine, settings, service, log)
    # db_name is a checked identifier (above), so it can stand in the SQL text.
    query = f"SELECT 1 FROM pg_database WHERE datname = '{settings.db_name}'"  # noqa: S608
    exists = _psql(engine, settings, container, "postgres", ["-tAc", query]).strip() == "1"
    if not exists:
        create = f'CREATE DATABASE "{settings.db_name}"'
        _psql(engine, settings, container, "postgres", ["-c", create])
        log(f"created database {settings.db_name}")
    else:
        log(f"database {settings.db_name} exists")
    if settings.db_init_sql:
        _copy_sql(engine, container, settings)
        for path in settings.db_init_sql:
            _psql(engine, settings, container, settings.db_name,
                  ["-v", "ON_ERROR_STOP=1", "-f", f"{_SQL_FOLDER}/{path.name}"])
            log(f"ran {path.name} on {settings.db_name}")
    if settings.db_init_command:
        log(f"running {settings.db_init_command!r} in {settings.require_image()}")
        code = run_in_app_image(
            engine, settings, settings.db_init_command, purpose="db-init",
            mounts=mounts_for(settings), log=log, node=node,
        )
        if code != 0:
            raise CommandFailed(
                f"LAYERKEEP_DB_INIT_COMMAND exited {code}", return_code=code
            )
    return DbReport(
        created=not exists,
        sql_files=len(settings.db_init_sql),
        command_ran=bool(settings.db_init_command),
        seconds=time.monotonic() - started,
        database=settings.db_name,
    )


def init_node_databases(engine: Engine, settings: Settings, *, log: Log = print) -> list[DbReport]:
    """:func:`init_database` for each local test node's database, node 1 (the
    LAYERKEEP_DB_NAME one) first: one unless LAYERKEEP_TEST_NODES is more than 1."""
    return [
        init_database(engine, each, log=log, node=node)
        for node, each in enumerate(local_node_settings(settings), 1)
    ]


def describe_databases(reports: list[DbReport]) -> str:
    """``created shortener_node2; shortener exists``: db.init's note."""
    created = [report.database for report in reports if report.created]
    existing = [report.database for report in reports if not report.created]
    parts = [f"created {', '.join(created)}"] if created else []
    if existing:
        parts.append(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}")
    return "; ".join(parts)


def _wait_for_postgres(engine: Engine, settings: Settings, service: ServiceSpec, log: Log) -> str:
    """The running postgres container's id, once its ready check passes (services' wait)."""
    job = engine.job_for(settings)
    container = job.container_name(service.name)
    attrs = engine.inspect_container(container)
    if attrs is None:
        raise DockerOperationError(
            f"postgres container {container} is not running", hint="run `inv services.up` first"
        )
    wait = ServiceWait(engine, job, service, str(attrs["Id"]), started=time.monotonic(), log=log)
    wait_ready([wait])
    return container


def _psql(
    engine: Engine, settings: Settings, container: str, database: str, args: list[str]
) -> str:
    command = ["psql", "-h", "127.0.0.1", "-U", settings.db_user, "-d", database, *args]
    code, output = _exec(engine, settings, container, command)
    if code != 0:
        raise DockerOperationError(f"psql in {container} failed (exit {code}): {output.strip()}")
    return output


def _exec(
    engine: Engine, settings: Settings, container: str, command: list[str]
) -> tuple[int, str]:
    # The password travels in the exec's environment, never on a command line.
    mask = engine.job_for(settings).mask
    try:
        result = engine.exec(container, command, environment={"PGPASSWORD": settings.db_password})
    except DockerOperationError as error:
        raise DockerOperationError(
            mask(error.message), hint="run `inv services.up` first"
        ) from None
    return result.exit_code, mask(result.output)


def _copy_sql(engine: Engine, container: str, settings: Settings) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in settings.db_init_sql:
            archive.add(str(path), arcname=f"layerkeep-sql/{path.name}")
    engine.put_archive(container, "/", buffer.getvalue())
