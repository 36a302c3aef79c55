"""One command's run: its plan, run in order, with failures, cleanup, summary and report.

:class:`~.executor.LayerkeepExecutor` makes one :class:`Run` for the calls of one `inv`
command and runs it; every task of the run gets a :class:`RunContext`, through which it
reaches the run's settings (run_settings.py: flags, the build-id lock), engines
(run_engines.py) and cleanup registry (see graph.py's helpers). A failure is one line
(failures.py), signals interrupt the work and wait for cleanup (run_signals.py), and
the run ends with its summary and report (run_report.py).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from invoke.collection import Collection
from invoke.config import Config
from invoke.context import Context
from invoke.exceptions import Exit
from invoke.parser import ParseResult
from invoke.tasks import Call, Task

from layerkeep.core.outcome import TaskRecord, format_summary
from layerkeep.core.settings import Settings
from layerkeep.preflight import check_before_start, needs_preflight

from .failures import Failure, describe_failure
from .layerkeep_task import LayerkeepTask, Skipped, role_of, title_of
from .run_engines import RunEngines
from .run_report import publish, summary_rows, task_row
from .run_settings import RunSettings
from .run_signals import RunSignals
from .taskkit import environ, say

# Where the executor lives, as Invoke's tasks.executor_class setting names it.
EXECUTOR_PATH = f"{__package__}.executor.LayerkeepExecutor"


class RunContext(Context):
    """The Invoke context every task of a layerkeep run gets: it carries the run."""

    layerkeep_run: Run

    def __init__(self, config: Config, *, remainder: str, run: Run) -> None:
        super().__init__(config=config, remainder=remainder)
        self._set(layerkeep_run=run)


def run_of(c: Context, title: str = "") -> Run:
    """The run of the task ``title``; one line saying what to set when there is none.

    Without layerkeep's executor, Invoke dedupes a task named on the command line apart
    from the same task reached through another's ``pre`` (their flags differ), so it
    would run twice: stop instead.
    """
    if isinstance(c, RunContext):
        return c.layerkeep_run
    where = f"{title}: " if title else ""
    raise Exit(
        f"layerkeep: {where}layerkeep's tasks run under its executor, and this Invoke "
        f"program uses another: set tasks.executor_class to {EXECUTOR_PATH} (or a "
        "subclass of it) in your Invoke config, or pass executor_class= to your Program",
        code=2,
    )


class Run:
    """One `inv` command: the plan Invoke expanded (each task once), run in order."""

    def __init__(
        self,
        plan: Sequence[Call],
        named: Sequence[Call],
        *,
        collection: Collection,
        config: Config,
        core: ParseResult,
    ) -> None:
        self.plan = list(plan)
        self.named = list(named)
        self.tasks = [call.task for call in plan]
        self.entries = [call.task for call in named]
        self.collection = collection
        self.config = config
        self.core = core
        self.dry = bool(config.run.dry)
        # Whether a task works for the job: its build id is then locked for the run.
        self.holds_job = any(isinstance(t, LayerkeepTask) and t.uses_job for t in self.tasks)
        self.records: dict[Task[Any], TaskRecord] = {}
        self.results: dict[Task[Any], Any] = {}
        self.cleanups: list[Task[Any]] = []
        self.failing = False
        self.error = ""
        self._settings = RunSettings(config, lock=self.holds_job and not self.dry)
        self._signals = RunSignals()
        self.engines = RunEngines()

    # Running ---------------------------------------------------------------------------

    def execute(self) -> dict[Task[Any], Any]:
        """Check, then run every task of the plan once; clean up and report, whatever
        happens. A failure ends as :class:`Exit` with its one line and exit code."""
        self._signals.arm()
        try:
            try:
                self._prepare()
            except BaseException as error:  # nothing started: no cleanup, no summary
                stopped = describe_failure(error)
                raise Exit(f"layerkeep: {stopped.line}", code=stopped.code) from None
            failure: Failure | None = None
            try:
                for call in self.plan:
                    failure = self._perform(call)
                    if failure is not None:
                        break
            except BaseException as error:  # a signal between two tasks
                failure = describe_failure(error)
                self.error = failure.line
            if failure is not None:
                self._clean_up()
            self._signals.hold("the summary")
            self._finish()
            if failure is not None:
                sys.stdout.flush()
                raise Exit(f"layerkeep: {self.error}", code=failure.code)
            return self.results
        finally:
            self._release()

    def _prepare(self) -> None:
        """The dry run's plan line, the settings with every flag, the lock, preflight."""
        self._settings.take_flags(self.named)
        if self.dry:
            steps = " -> ".join(title_of(t) for t in self.tasks if role_of(t) != "group")
            say(f"dry run, nothing is changed; plan: {steps}")
        if not (self.holds_job or self._settings.flags):
            return
        current = self.settings()
        if self.dry or not needs_preflight({title_of(t) for t in self.tasks}):
            return
        checked = self.entries if current.skip_dependencies else self.tasks
        check_before_start(current, {title_of(t) for t in checked}, environ(), log=say)

    def _perform(self, call: Call) -> Failure | None:
        """Run one call and record it; the failure that stops the run, if it does."""
        task = call.task
        if role_of(task) != "group":
            say(f"==> {title_of(task)}{' (cleanup)' if self.failing else ''}")
        started, wall = time.monotonic(), time.time()
        try:
            skipped = self._skips(task)
            result = Skipped("LAYERKEEP_SKIP_DEPENDENCIES") if skipped else self._call(call)
        except BaseException as error:
            return self._failed(task, error, time.monotonic() - started, wall)
        self.results[task] = result
        if call.autoprint and task in self.entries:
            print(result)
        self.records[task] = task_row(
            task, result, dry=self.dry, seconds=time.monotonic() - started,
            cleanup=self.failing, started=wall,
        )
        return None

    def _call(self, call: Call) -> Any:
        # What Invoke's Executor.execute does for each call, with our context.
        self.config.load_collection(self.collection.configuration(call.called_as))
        self.config.load_shell_env()
        context = RunContext(self.config, remainder=self.core.remainder, run=self)
        return call.task(context, *call.args, **call.kwargs)

    def _skips(self, task: Task[Any]) -> bool:
        """A task the entries depend on, when the user asked to run only the entries."""
        if task in self.entries or role_of(task) == "group" or self.failing:
            return False
        return self._settings.loaded is not None and self.settings().skip_dependencies

    def _failed(
        self, task: Task[Any], error: BaseException, seconds: float, wall: float
    ) -> Failure | None:
        failure = describe_failure(error)
        title = title_of(task)
        if self.failing:  # a cleanup step failed: report it beside the first error
            self.records[task] = TaskRecord(title, "failed", seconds, failure.line, True, wall)
            say(f"warning: cleanup {title} failed: {failure.line}")
            return None
        if role_of(task) == "cache" and task not in self.entries and not failure.interrupted:
            self.records[task] = TaskRecord(title, "warn", seconds, failure.line, False, wall)
            say(f"warning: {title}: {failure.line} (the job goes on without it)")
            return None
        self.records[task] = TaskRecord(title, "failed", seconds, failure.line, False, wall)
        self.error = f"{title}: {failure.line}"
        return failure

    def _clean_up(self) -> None:
        """Run the plan's cleanup tasks and the registered ones; signals wait meanwhile.

        Without settings (they did not load) this run cannot have started anything.
        """
        self.failing = True
        if self._settings.loaded is None:
            return
        self._signals.hold("cleanup")
        pending = [t for t in self.tasks if role_of(t) == "cleanup" and t not in self.records]
        pending += [t for t in self.cleanups if t not in self.records and t not in pending]
        for task in pending:
            self._perform(Call(task))

    def register_cleanup(self, task: Task[Any]) -> None:
        """Run ``task`` if this run fails or is interrupted (e.g. services.down)."""
        if task not in self.cleanups:
            self.cleanups.append(task)

    # The summary and the report ------------------------------------------------------

    def _finish(self) -> None:
        rows = summary_rows(self.tasks, self.records)
        if len(rows) > 1 or self.failing:
            say("")
            say(format_summary(rows))
        current = self._settings.current
        if current is not None and not self.dry and self.holds_job:  # `inv settings` only looks
            publish(rows, current, entries=self.entries, error=self.error)

    # Settings --------------------------------------------------------------------------

    def settings(self) -> Settings:
        """The settings, loaded once per run, with the flags of every task named on the
        command line; the build id is locked for a run that works for the job."""
        return self._settings.resolve()

    @contextmanager
    def flags_for(self, title: str, given: Mapping[str, object]) -> Iterator[None]:
        """Flags a task was called with directly (from another task's body), for that
        call only; those the command line gave already are no change."""
        with self._settings.flags_for(title, given):
            yield

    def _release(self) -> None:
        self.engines.close()
        self._settings.release()
        self._signals.restore()
