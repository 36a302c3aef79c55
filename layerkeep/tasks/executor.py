"""layerkeep's Invoke executor, and how the plain `inv` binary comes to use it.

**Why an executor.** Invoke expands each command's ``pre``/``post`` and dedupes the
calls with ``Call.__eq__``, which compares kwargs: a task named on the command line
carries all its flags (defaults included) and the same task reached through another
task's ``pre`` carries none, so ``inv image.build test.run`` ran image.build twice.
:class:`LayerkeepExecutor` sees the whole call list of one command, so it plans it (each
task once, first occurrence in Invoke's expansion order) and runs it as one
:class:`~.run.Run`, which owns the settings with every named task's flags, the build-id
lock, the checks before start, cleanup, signals, the summary and the report. A command
without any layerkeep task runs exactly as Invoke's own executor runs it.

**How it is installed.** ``Program.execute`` takes the executor class from the
``tasks.executor_class`` setting when the Program's config has one, else from the
Program's ``executor_class`` attribute. Only the config levels the Program loads itself
reach that point (invoke.yaml files: system, user, the project's; ``-f`` /
``INVOKE_RUNTIME_CONFIG``): a collection's ``configure()`` and ``INVOKE_*`` variables are
merged by the executor, per call, once it already runs. A project file is what users
must not need, so neither works. But the ``inv`` and ``invoke`` scripts and ``python -m
invoke`` all run one Program object, ``invoke.main.program``, which calls ``execute``
only after ``load_collection`` imported the project's tasks module. So importing
``layerkeep.tasks`` (what the one-line tasks.py does) sets that object's
``executor_class`` to ours while it is Invoke's default (:func:`install`). A
``tasks.executor_class`` setting still wins, as Invoke's precedence says, and is used
when it names a subclass of ours; any other executor, or a Program of one's own, meets
the first layerkeep task it runs, which stops with one line saying what to set
(:func:`~.run.run_of`) instead of running anything twice.
"""

from __future__ import annotations

from typing import Any

from invoke import main as invoke_main
from invoke.executor import Executor
from invoke.program import Program
from invoke.tasks import Call, Task

from .layerkeep_task import LayerkeepTask
from .run import Run
from .taskkit import say


class LayerkeepExecutor(Executor):
    """Runs a command's tasks each once, as one layerkeep run (see the module doc)."""

    def execute(self, *tasks: Any) -> dict[Task[Any], Any]:
        """Plan the named tasks and run the plan; a command of no layerkeep task is
        Invoke's own business."""
        named = self.normalize(tasks)
        planned = self.plan(named)
        if not any(isinstance(call.task, LayerkeepTask) for call in planned):
            return super().execute(*tasks)
        if not _dedupes(self):
            say("--no-dedupe does not apply to layerkeep's tasks: each runs once")
        run = Run(planned, named, collection=self.collection, config=self.config, core=self.core)
        return run.execute()

    def plan(self, named: list[Call]) -> list[Call]:
        """Every task the ``named`` calls need, each once, where Invoke's expansion has
        it first; a task named on the command line runs with the flags given there."""
        given: dict[Task[Any], Call] = {}
        for call in named:
            given.setdefault(call.task, call)
        planned: list[Call] = []
        seen: set[Task[Any]] = set()
        for call in self.expand_calls(named):
            if call.task not in seen:
                seen.add(call.task)
                planned.append(given.get(call.task, call))
        return planned


def _dedupes(executor: Executor) -> bool:
    try:
        return bool(executor.config.tasks.dedupe)
    except AttributeError:  # a bare Config, as Invoke's own executor allows
        return True


def install(program: Program = invoke_main.program) -> None:
    """Make ``program`` (by default the one `inv`, `invoke` and `python -m invoke` run)
    use :class:`LayerkeepExecutor`, unless it was given an executor of its own."""
    if program.executor_class is Executor:
        program.executor_class = LayerkeepExecutor
