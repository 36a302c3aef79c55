"""services.*: the job's service containers (postgres, redis, ...) on its own network."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.core.errors import ConfigError
from layerkeep.services.containers import services_down, services_up
from layerkeep.services.containers import sweep as sweep_leftovers

from .taskkit import engine_for, reported, say, settings


@task
@reported
def up(c: Context) -> None:
    """Start LAYERKEEP_SERVICES on the job's network and wait until each is ready."""
    current = settings(c)
    services_up(engine_for(current), current, log=say)


@task
@reported
def down(c: Context) -> None:
    """Remove this job's service containers (with their volumes) and its network."""
    current = settings(c)
    services_down(engine_for(current), current, log=say)


@task(
    help={
        "older_than": "seconds; remove leftovers created earlier than this "
        "(default: LAYERKEEP_SWEEP_AFTER)",
        "all_projects": "sweep every layerkeep project's leftovers, not only this one's",
    }
)
@reported
def sweep(c: Context, older_than: str | None = None, all_projects: bool = False) -> None:
    """Remove containers and networks that killed jobs left behind."""
    current = settings(c)
    seconds = current.sweep_after
    if older_than is not None:
        if not older_than.strip().isdigit():
            raise ConfigError(
                f"--older-than={older_than!r} is not valid",
                hint="use a whole number of seconds, e.g. 3600",
            )
        seconds = int(older_than)
    sweep_leftovers(
        engine_for(current),
        older_than=seconds,
        log=say,
        project=None if all_projects else current.project,
    )
