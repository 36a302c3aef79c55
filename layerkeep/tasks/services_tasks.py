"""services.*: the job's service containers (postgres, redis, ...) on its own network."""

from invoke.context import Context

from layerkeep.dryrun import down_plan, services_plan
from layerkeep.services.containers import services_down, services_up
from layerkeep.services.containers import sweep as sweep_leftovers

from .cache_load_tasks import load
from .graph import (
    Done,
    Note,
    Skipped,
    engine,
    is_dry,
    register_cleanup,
    say_plan,
    settings,
    step,
)
from .taskkit import masked_log, meters, say


@step("services.down", role="cleanup")
def down(c: Context) -> Note:
    """Remove this job's service containers (with their volumes) and its network."""
    current = settings(c)
    if is_dry(c):
        return say_plan(down_plan(current))
    if current.keep_services:
        say("services kept (LAYERKEEP_KEEP_SERVICES or --keep-services)")
        return Skipped("kept on purpose")
    return f"{services_down(engine(c, current), current, log=masked_log(current))} removed"


@step("services.up", pre=[load])
def up(c: Context) -> Note:
    """Start LAYERKEEP_SERVICES on the job's network and wait until each is ready."""
    current = settings(c)
    if is_dry(c):
        return say_plan(services_plan(current))
    if not current.services:
        return Skipped("no services configured")
    # Whatever happens next in this run, what starts here is removed if the run fails.
    register_cleanup(c, down)
    running = services_up(
        engine(c, current), current, log=masked_log(current), progress=meters()
    )
    names = [service.spec.name for service in running]
    return Done(", ".join(names) + " ready", {"services": names})


@step(
    "services.sweep",
    flags=["--older-than"],
    help={"all_projects": "sweep every layerkeep project's leftovers, not only this one's"},
)
def sweep(c: Context, all_projects: bool = False) -> Note:
    """Remove containers and networks that killed jobs left behind."""
    current = settings(c)
    seconds = current.sweep_after
    if is_dry(c):
        return say_plan([f"would remove layerkeep containers and networks older than {seconds} s"])
    removed = sweep_leftovers(
        engine(c, current),
        older_than=seconds,
        log=masked_log(current),
        project=None if all_projects else current.project,
    )
    return f"{removed} removed"
