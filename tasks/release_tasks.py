"""release.*: push the built app image to LAYERKEEP_REGISTRY under its release tags."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.release.push import push_release

from .taskkit import engine_for, reported, say, settings


@task(help={"dry_run": "print the tags and the registry, push and tag nothing"})
@reported
def push(c: Context, dry_run: bool = False) -> None:
    """Tag the app image (commit, branch, latest, release tags), push and verify each."""
    current = settings(c)
    push_release(engine_for(current), current, dry_run=dry_run, log=say)
