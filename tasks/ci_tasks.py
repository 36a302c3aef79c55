"""ci: the whole job, in order, with cleanup that always runs and a summary at the end.

A project adds its own step from its tasks.py, without editing ours::

    from layerkeep.tasks import ci_tasks
    ci_tasks.add_step(project_tasks.lint, after="image.build")
"""

import functools
from collections.abc import Callable

from invoke.context import Context
from invoke.tasks import task

from layerkeep.pipeline import (
    Step,
    ci_steps,
    cleanup_steps,
    format_summary,
    insert_step,
    run_pipeline,
)

from .taskkit import engine_for, environ, reported, say, settings

_EXTRA_STEPS: list[tuple[str, str, Callable[[Context], object]]] = []


def add_step(step: Callable[[Context], object], *, after: str = "", name: str = "") -> None:
    """Run ``step`` (an Invoke task or a function taking the context) within `inv ci`.

    ``after`` names the step it follows (e.g. "image.build"); default: after test.run.
    """
    _EXTRA_STEPS.append((name or getattr(step, "name", None) or step.__name__, after, step))


@task
@reported
def ci(c: Context) -> None:
    """The whole CI job in order; services.down always runs; a summary at the end.

    git.touch, cache.load, image.build, cache.save, services.up, db.init, test.run, and
    release.push when a registry is configured.
    """
    current = settings(c)
    engine = engine_for(current)
    steps = ci_steps(engine, current, environ(), say)
    for name, after, body in _EXTRA_STEPS:
        insert_step(steps, Step(name, functools.partial(_run_extra, body, c)), after=after)
    report = run_pipeline(steps, cleanup=cleanup_steps(engine, current, say), log=say)
    say("")
    say(format_summary(report))
    if report.error is not None:
        raise report.error


def _run_extra(body: Callable[[Context], object], c: Context) -> str:
    result = body(c)
    return result if isinstance(result, str) else ""
