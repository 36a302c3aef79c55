"""db.*: prepare the test database."""

from invoke.context import Context

from layerkeep.dryrun import db_plan
from layerkeep.testrun.database import describe_databases, init_node_databases

from .graph import Note, Skipped, engine, is_dry, say_plan, settings, step
from .image_tasks import build
from .services_tasks import up
from .taskkit import masked_log, say


@step("db.init", pre=[build, up], flags=["--nodes"])
def init(c: Context) -> Note:
    """Create LAYERKEEP_DB_NAME if missing, then run LAYERKEEP_DB_INIT_SQL / _COMMAND.

    With --nodes N, the same for each test node's database (<name>_node2, ...).
    """
    current = settings(c)
    if not any(service.name == current.db_service for service in current.services):
        return Skipped(f"no database service ({current.db_service}) in LAYERKEEP_SERVICES")
    if is_dry(c):
        return say_plan(db_plan(current))
    reports = init_node_databases(engine(c, current), current, log=masked_log(current))
    say(f"db.init done in {sum(report.seconds for report in reports):.1f} s")
    return describe_databases(reports)
