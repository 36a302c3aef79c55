"""test.*: run the project's tests inside the app image, against the job's services."""

from invoke.context import Context

from layerkeep.core.errors import CommandFailed
from layerkeep.dryrun import tests_plan
from layerkeep.testrun.run import run_tests

from .db_tasks import init
from .graph import Done, Note, engine, is_dry, say_plan, settings, step
from .image_tasks import build
from .services_tasks import down, up
from .taskkit import environ, masked_log


@step("test.run", pre=[build, up, init], post=[down], flags=["--keep-services", "--nodes"])
def run(c: Context) -> Note:
    """Build, start services, init the DB, run the tests in the app image, stop services.

    Its prerequisites come from the graph (image.build, services.up, db.init) and
    services.down runs after it, also when the tests fail or the run is interrupted.
    With LAYERKEEP_TEST_FILES, a CI node runs its share of the files, and --nodes N
    runs N test containers at once, each with its own database.
    """
    current = settings(c)
    if is_dry(c):
        return say_plan(tests_plan(current))
    result = run_tests(engine(c, current), current, log=masked_log(current), environ=environ())
    if not result.passed:
        raise CommandFailed(
            f"tests failed (exit {result.exit_code}): {result.note()}",
            return_code=result.exit_code,
        )
    figures = {"exit_code": result.exit_code, "reports": [str(path) for path in result.reports]}
    if result.nodes:
        figures |= {
            "nodes": [node.figures() for node in result.nodes],
            "split": result.split,
            "timings_saved": result.timings_saved,
        }
    return Done(result.note(), figures)
