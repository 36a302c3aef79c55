"""One command's run: its plan, settings, lock, failures, cleanup, summary and report.

:class:`~.executor.LayerkeepExecutor` makes one :class:`Run` for the calls of one `inv`
command and runs it; every task of the run gets a :class:`RunContext`, through which it
reaches the run's settings, engine and cleanup registry (see graph.py's helpers).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from invoke.collection import Collection
from invoke.config import Config
from invoke.context import Context
from invoke.exceptions import Exit, UnexpectedExit
from invoke.parser import ParseResult
from invoke.tasks import Call, Task

from layerkeep.building.builder import Builder, choose_builder
from layerkeep.core.engine import ENGINE_ERRORS, Engine, translate
from layerkeep.core.errors import ConfigError, LayerkeepError
from layerkeep.core.joblock import JobLock, hold_build_id
from layerkeep.core.outcome import (
    Result,
    TaskRecord,
    format_summary,
    markdown_summary,
    report_document,
    write_report,
)
from layerkeep.core.settings import FLAGS, Key, Settings
from layerkeep.preflight import check_before_start, needs_preflight

from .taskkit import engine_for, environ, load_project_settings, say

Role = Literal["work", "cache", "cleanup", "group"]
_SIGNAL_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
# Where the executor lives, as Invoke's tasks.executor_class setting names it.
EXECUTOR_PATH = f"{__package__}.executor.LayerkeepExecutor"


@dataclass(frozen=True)
class Skipped:
    """What a task returns when it had nothing to do; the text says why."""

    reason: str


@dataclass(frozen=True)
class Done:
    """What a task returns: its summary note and its figures for the JSON report."""

    note: str
    figures: Mapping[str, Any] = field(default_factory=dict)


Note = str | Skipped | Done | None


class LayerkeepTask(Task[Any]):
    """An Invoke task with a title for the summary, a role in the run, and the setting
    flags it takes (``flags``: declared with their settings in core/settings/declarations.py).
    """

    def __init__(
        self,
        body: Callable[..., Any],
        *,
        title: str,
        role: Role,
        inner: Callable[..., Note],
        flags: Sequence[Key],
        uses_job: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(body, **kwargs)
        self.title = title
        self.role = role
        self.inner = inner
        self.flags = tuple(flags)
        self.uses_job = uses_job


def title_of(task: Task[Any]) -> str:
    """The name a task has in the summary."""
    return task.title if isinstance(task, LayerkeepTask) else str(task.name)


def role_of(task: Task[Any]) -> Role:
    """A task's role; a project's plain Invoke task is work."""
    return task.role if isinstance(task, LayerkeepTask) else "work"


class Interrupted(BaseException):
    """A termination signal arrived while the run worked."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Failure:
    """A failure as a user sees it: one line and an exit code."""

    line: str
    code: int
    interrupted: bool = False


def describe_failure(error: BaseException) -> Failure:
    """Turn whatever a task raised into one line and an exit code: the one place."""
    if isinstance(error, ENGINE_ERRORS):
        error = translate(error)
    if isinstance(error, LayerkeepError):
        return Failure(error.one_line(), error.exit_code)
    if isinstance(error, Interrupted | KeyboardInterrupt):
        signum = error.signum if isinstance(error, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        return Failure(f"interrupted by {name}", 128 + signum, interrupted=True)
    if isinstance(error, UnexpectedExit):
        result = error.result
        return Failure(f"command {result.command!r} exited {result.exited}", result.exited or 1)
    if isinstance(error, Exit):
        message = str(error.message or "stopped").removeprefix("layerkeep: ")
        return Failure(message, error.code)
    if isinstance(error, SystemExit):
        code = error.code if isinstance(error.code, int) else 1
        return Failure(f"exited {code}", code or 1)
    text = " ".join(str(error).split()) or "no message"
    return Failure(f"{type(error).__name__}: {text[:300]}", 1)


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
        self._flags: dict[str, tuple[str, str]] = {}
        self._loaded: Settings | None = None
        self._current: Settings | None = None
        self._lock: JobLock | None = None
        self._engines: dict[tuple[str, str], Engine] = {}
        self._builders: dict[tuple[str, str, str, str], Builder] = {}
        self._old_handlers: dict[int, Any] = {}

    # Running ---------------------------------------------------------------------------

    def execute(self) -> dict[Task[Any], Any]:
        """Check, then run every task of the plan once; clean up and report, whatever
        happens. A failure ends as :class:`Exit` with its one line and exit code."""
        self._arm_signals()
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
            self._hold_signals("the summary")
            self._finish()
            if failure is not None:
                sys.stdout.flush()
                raise Exit(f"layerkeep: {self.error}", code=failure.code)
            return self.results
        finally:
            self._release()

    def _prepare(self) -> None:
        """The dry run's plan line, the settings with every flag, the lock, preflight."""
        self._flags = _named_flags(self.named)
        if self.dry:
            steps = " -> ".join(title_of(t) for t in self.tasks if role_of(t) != "group")
            say(f"dry run, nothing is changed; plan: {steps}")
        if not (self.holds_job or self._flags):
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
        outcome: Result = "ok"
        text, figures = "", {}
        if isinstance(result, Skipped):
            outcome, text = "skipped", result.reason
        elif self.dry:
            outcome = "would run"
        elif isinstance(result, Done):
            text, figures = result.note, dict(result.figures)
        elif isinstance(result, str):
            text = result
        self.records[task] = TaskRecord(
            title_of(task), outcome, time.monotonic() - started, text, self.failing, wall,
            figures,
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
        return self._loaded is not None and self.settings().skip_dependencies

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
        if self._loaded is None:
            return
        self._hold_signals("cleanup")
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
        rows = self.summary_rows()
        if len(rows) > 1 or self.failing:
            say("")
            say(format_summary(rows))
        self._publish(rows)

    def summary_rows(self) -> list[TaskRecord]:
        """The plan's rows in order (not run where the run stopped), then extra cleanups."""
        rows = [
            self.records.get(task, TaskRecord(title_of(task), "not run"))
            for task in self.tasks
            if role_of(task) != "group"
        ]
        rows += [
            record
            for task, record in self.records.items()
            if task not in self.tasks and role_of(task) != "group"
        ]
        return rows

    def _publish(self, rows: list[TaskRecord]) -> None:
        """The JSON report in the reports folder; the CI's job summary where it has one."""
        current = self._current
        if current is None or self.dry or not self.holds_job:  # `inv settings` only looks
            return
        job = {
            "project": current.project,
            "build_id": current.build_id,
            "commit": current.commit,
            "branch": current.branch,
        }
        try:
            write_report(current.reports_dir, report_document(rows, job=job, error=self.error))
            step_summary = environ().get("GITHUB_STEP_SUMMARY")
            if step_summary:
                title = f"layerkeep: {', '.join(title_of(t) for t in self.entries)}"
                with Path(step_summary).open("a", encoding="utf-8") as stream:
                    stream.write(markdown_summary(rows, title=title))
        except OSError as error:
            say(f"warning: could not write the run report: {error}")

    # Settings, the job's build id, the engine -----------------------------------------

    def settings(self) -> Settings:
        """The settings, loaded once per run, with the flags of every task named on the
        command line; the build id is locked for a run that works for the job."""
        if self._current is None:
            if self._loaded is None:
                self._loaded = load_project_settings(self.config)
            current = _with_flags(self._loaded, self._flags)
            if self.holds_job and not self.dry and self._lock is None:
                self._lock = self._lock_build_id(current)
            # Flags resolve the settings again, from what was loaded: the locked id
            # goes on top each time.
            if self._lock is not None and self._lock.build_id != current.build_id:
                current = replace(current, build_id=self._lock.build_id)
            self._current = current
        return self._current

    @contextmanager
    def flags_for(self, title: str, given: Mapping[str, object]) -> Iterator[None]:
        """Flags a task was called with directly (from another task's body), for that
        call only; those the command line gave already are no change."""
        keys = {key.field: key for key in _flag_keys(given)}
        new = {
            name: (text, title)
            for name, key in keys.items()
            if (text := key.flag_text(given[key.param])) is not None
            and self._flags.get(name, ("", ""))[0] != text
        }
        if not new:
            yield
            return
        saved = self._flags, self._current
        self._flags = {**self._flags, **new}
        self._current = None
        try:
            yield
        finally:
            self._flags, self._current = saved

    def engine(self, settings: Settings) -> Engine:
        """One connection per job for the whole run, closed when the run ends."""
        key = (settings.project, settings.build_id)
        if key not in self._engines:
            self._engines[key] = engine_for(settings)
        return self._engines[key]

    def builder(self, settings: Settings) -> Builder:
        """The builder the settings resolve to, found once per run (probing the docker
        CLIs takes a few subprocesses) and shared by cache.load, image.build and
        cache.save."""
        key = (settings.project, settings.build_id, settings.builder, settings.docker_cli)
        if key not in self._builders:
            self._builders[key] = choose_builder(
                settings.builder, environ(), cli=settings.docker_cli, engine=self.engine(settings)
            )
        return self._builders[key]

    def _lock_build_id(self, settings: Settings) -> JobLock:
        # Only the built-in "local" (no CI, nothing set) may move to a free id.
        configured = not (
            settings.build_id == "local"
            and settings.origins.get("LAYERKEEP_BUILD_ID", "default").startswith("default")
        )
        lock = hold_build_id(
            environ().get("DOCKER_HOST", "unix:///var/run/docker.sock"),
            settings.project,
            settings.build_id,
            configured=configured,
            command=" ".join(["inv", *sys.argv[1:]]),
        )
        if lock.build_id != settings.build_id:
            say(
                f"build id {settings.build_id!r} is in use by another run on this engine; "
                f"this run uses {lock.build_id!r}"
            )
        return lock

    def _release(self) -> None:
        for connected in self._engines.values():
            connected.close()
        self._engines = {}
        self._builders = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._restore_signals()

    # Signals ---------------------------------------------------------------------------

    def _arm_signals(self) -> None:
        """SIGTERM (what CI sends on cancel) interrupts the run like SIGINT does."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNAL_CODES:
            self._old_handlers[signum] = signal.signal(signum, _interrupt)

    def _hold_signals(self, what: str) -> None:
        """A signal is noted, not acted on, while ``what`` must finish."""
        if not self._old_handlers:
            return

        def note(signum: int, _: FrameType | None) -> None:
            say(f"{signal.Signals(signum).name} received: finishing {what} first")

        for signum in _SIGNAL_CODES:
            signal.signal(signum, note)

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}


def _interrupt(signum: int, _: FrameType | None) -> None:
    raise Interrupted(signum)


def _flag_keys(given: Mapping[str, object]) -> list[Key]:
    return [key for key in FLAGS.values() if key.param in given]


def _named_flags(named: Sequence[Call]) -> dict[str, tuple[str, str]]:
    """The setting flags of the tasks named on the command line: field -> (text, task).

    They hold for every task of the command. One flag given two values (by two tasks)
    is an error: the run has one settings object.
    """
    flags: dict[str, tuple[str, str]] = {}
    for call in named:
        task = call.task
        if not isinstance(task, LayerkeepTask):
            continue
        for key in task.flags:
            text = key.flag_text(call.kwargs.get(key.param))
            if text is None:
                continue
            earlier = flags.get(key.field)
            if earlier is not None and earlier[0] != text:
                raise ConfigError(
                    f"{key.flag} is given twice: {earlier[0]!r} ({earlier[1]}) and "
                    f"{text!r} ({task.title})",
                    key=key.name,
                    hint="give it once: it holds for every task of the command",
                )
            flags[key.field] = (text, task.title)
    return flags


def _with_flags(settings: Settings, flags: Mapping[str, tuple[str, str]]) -> Settings:
    """``settings`` with the flags on top; a bad value is named with its task."""
    try:
        return settings.with_flags(**{name: text for name, (text, _) in flags.items()})
    except ConfigError as error:
        title = next(
            (task for name, (_, task) in flags.items() if error.key == f"LAYERKEEP_{name.upper()}"),
            "",
        )
        if not title:
            raise
        raise ConfigError(
            f"{title}: {error.message}", key=error.key, hint=error.hint
        ) from None
