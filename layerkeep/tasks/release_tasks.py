"""release.*: push the tested app image to LAYERKEEP_REGISTRY under its release tags."""

from invoke.context import Context

from layerkeep.dryrun import release_plan
from layerkeep.release.push import push_release

from .graph import Done, Note, Skipped, engine, is_dry, say_plan, settings, step
from .taskkit import masked_log, meters
from .testrun_tasks import run as run_tests


@step(
    "release.push",
    pre=[run_tests],
    help={"dry_run": "print the tags and the registry, push and tag nothing (like inv --dry)"},
)
def push(c: Context, dry_run: bool = False) -> Note:
    """After the tests pass: tag the app image (commit, branch, latest), push, verify."""
    current = settings(c)
    if not current.registry:
        return Skipped("no LAYERKEEP_REGISTRY")
    if is_dry(c):
        return say_plan(release_plan(current))
    report = push_release(
        engine(c, current), current, dry_run=dry_run, log=masked_log(current),
        progress=meters(),
    )
    if not report.plan.pushes:
        return Skipped(report.plan.reason)
    if dry_run:
        return "dry run"
    figures = {
        "tags": [tag.reference for tag in report.pushed],
        "digest": report.digest,
        "bytes_pushed": report.bytes_pushed,
    }
    return Done(f"{len(report.pushed)} tags at {report.digest[:19]}", figures)
