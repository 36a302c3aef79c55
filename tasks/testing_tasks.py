"""test.*: run the project's tests inside the app image."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.core.errors import CommandFailed
from layerkeep.services.containers import services_down, services_up
from layerkeep.testing.database import init_database
from layerkeep.testing.testrun import run_tests

from .taskkit import engine_for, reported, say, settings


@task(help={"keep_services": "leave the services running afterwards, for debugging"})
@reported
def run(c: Context, keep_services: bool = False) -> None:
    """Start services, init the DB, run the tests in the app image, remove the services.

    The services are removed even when a step fails (Invoke skips `post` tasks on
    failure, so this is a try/finally), unless kept.
    """
    current = settings(c, keep_services="yes" if keep_services else None)
    engine = engine_for(current)
    try:
        if current.services:
            services_up(engine, current, log=say)
            if any(s.name == current.db_service for s in current.services):
                init_database(engine, current, log=say)
        result = run_tests(engine, current, log=say)
    finally:
        if current.services and not current.keep_services:
            services_down(engine, current, log=say)
    if not result.passed:
        raise CommandFailed(f"tests failed (exit {result.exit_code})", return_code=result.exit_code)
