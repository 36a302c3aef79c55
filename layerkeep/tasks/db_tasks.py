"""db.*: prepare the test database."""

from invoke.context import Context

from layerkeep.dryrun import db_plan
from layerkeep.testrun.database import init_database

from .graph import Note, Skipped, engine, is_dry, say_plan, settings, step
from .image_tasks import build
from .services_tasks import up
from .taskkit import masked_log, say


@step("db.init", pre=[build, up])
def init(c: Context) -> Note:
    """Create LAYERKEEP_DB_NAME if missing, then run LAYERKEEP_DB_INIT_SQL / _COMMAND."""
    current = settings(c)
    if not any(service.name == current.db_service for service in current.services):
        return Skipped(f"no database service ({current.db_service}) in LAYERKEEP_SERVICES")
    if is_dry(c):
        return say_plan(db_plan(current))
    report = init_database(engine(c, current), current, log=masked_log(current))
    say(f"db.init done in {report.seconds:.1f} s")
    return f"created {current.db_name}" if report.created else f"{current.db_name} exists"
