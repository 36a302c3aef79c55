"""db.*: prepare the test database."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.testing.database import init_database

from .taskkit import engine_for, reported, say, settings


@task
@reported
def init(c: Context) -> None:
    """Create LAYERKEEP_DB_NAME if missing, then run LAYERKEEP_DB_INIT_SQL / _COMMAND."""
    current = settings(c)
    report = init_database(engine_for(current), current, log=say)
    say(f"db.init done in {report.seconds:.1f} s")
