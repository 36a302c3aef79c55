"""layerkeep's Invoke collection: `inv --list` shows it; other projects import it.

In another project's tasks.py, the one line::

    from layerkeep.tasks import ns

or, with the project's own steps inside `inv ci` (after test.run unless named)::

    from invoke import Collection
    from layerkeep.tasks import collection
    import project_tasks
    ns = collection(steps=[project_tasks.lint, (project_tasks.smoke, "image.build")])
    ns.add_collection(Collection.from_module(project_tasks), "project")
"""

from collections.abc import Callable, Iterable
from typing import Any

from invoke.collection import Collection
from invoke.tasks import Task

from layerkeep.core.errors import LayerkeepError

from . import (
    cache_admin_tasks,
    cache_load_tasks,
    cache_save_tasks,
    ci_tasks,
    db_tasks,
    git_tasks,
    image_tasks,
    release_tasks,
    services_tasks,
    settings_tasks,
    standin_tasks,
    testrun_tasks,
)
from .executor import LayerkeepExecutor, install
from .graph import step, with_steps

__all__ = ["LayerkeepExecutor", "collection", "ns", "step"]

# The plain `inv` runs layerkeep's executor from here on (see executor.py's docstring).
install()

# Invoke's @task is typed as returning a plain callable; each one is checked to be a task.
StepSpec = Callable[..., Any] | tuple[Callable[..., Any], str]


def collection(steps: Iterable[StepSpec] = ()) -> Collection:
    """layerkeep's tasks, with ``steps`` (a project's tasks) put into `inv ci`.

    Each step is a task (run after test.run, before release.push) or a pair
    ``(task, "image.build")`` naming the task it follows.
    """
    placed = [_placed(item) for item in steps]
    made = Collection()
    made.add_collection(Collection("git", git_tasks.touch))
    made.add_collection(
        Collection(
            "cache", cache_load_tasks.load, cache_save_tasks.save,
            cache_admin_tasks.status, cache_admin_tasks.prune,
        )
    )
    made.add_collection(Collection("image", image_tasks.build))
    made.add_collection(
        Collection("services", services_tasks.up, services_tasks.down, services_tasks.sweep)
    )
    made.add_collection(Collection("db", db_tasks.init))
    made.add_collection(Collection("test", testrun_tasks.run))
    made.add_collection(Collection("release", release_tasks.push))
    made.add_collection(Collection("standins", standin_tasks.build))
    made.add_task(settings_tasks.show, name="settings")
    made.add_task(with_steps(ci_tasks.ci, placed) if placed else ci_tasks.ci)
    return made


ns = collection()


def _placed(item: StepSpec) -> tuple[Task[Any], str]:
    """A step as (task, the title it follows); a bare task follows test.run."""
    made, after = item if isinstance(item, tuple) else (item, "test.run")
    if not isinstance(made, Task):
        raise LayerkeepError(
            f"cannot add {made!r} to inv ci: it is not an Invoke task",
            hint="decorate it with @invoke.task",
        )
    return made, after
