"""The task graph is Invoke's own ``pre``/``post``; this adds what Invoke leaves out.

Invoke expands and dedupes each task's ``pre`` and ``post`` and runs the calls in order;
after a failure it runs nothing more, not even ``post`` tasks. Every layerkeep task is
made with :func:`step`, which wraps its body so that the run keeps one :class:`Run` on
the shared Invoke config:

- the plan: each task's first ``pre`` is a hidden call that announces it, so the run
  knows what Invoke expanded, which tasks were asked for directly, and what is left;
- one line per failure, never a traceback, and the failure's exit code;
- cleanup after a failure, an uncaught error, SIGINT or SIGTERM: the ``cleanup`` tasks
  of the plan and those a started task registered (services.up registers
  services.down), each reported beside the original error, never instead of it;
- a cache step that serves another task only warns when it fails: the job goes on;
- the summary table at the end, whatever happened;
- ``inv --dry``: the plan is printed and each task says what it would do.
"""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any, Literal, cast

from invoke.collection import Collection
from invoke.context import Context
from invoke.exceptions import Exit, UnexpectedExit
from invoke.executor import Executor
from invoke.tasks import Call, Task, call

from layerkeep.build.image import Builder, choose_builder
from layerkeep.core.engine import ENGINE_ERRORS, Engine, translate
from layerkeep.core.errors import LayerkeepError
from layerkeep.core.joblock import JobLock, hold_build_id
from layerkeep.core.outcome import (
    Result,
    TaskRecord,
    format_summary,
    markdown_summary,
    report_document,
    write_report,
)
from layerkeep.core.settings import Settings
from layerkeep.preflight import check_before_start, needs_preflight

from .taskkit import engine_for, environ, load_project_settings, say

Role = Literal["work", "cache", "cleanup", "group"]
_RUN_KEY = "layerkeep_run"
SETTINGS_POINTER = (
    "Settings are LAYERKEEP_* keys in layerkeep.env, .env or the environment: "
    "`inv settings` shows each value and where it came from."
)
_SIGNAL_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class LayerkeepTask(Task[Any]):
    """An Invoke task with a title for the summary and a role in the run."""

    def __init__(
        self,
        body: Callable[..., Any],
        *,
        title: str,
        role: Role,
        inner: Callable[..., Note],
        **kwargs: Any,
    ) -> None:
        super().__init__(body, **kwargs)
        self.title = title
        self.role = role
        self.inner = inner


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


def step(
    title: str,
    *,
    pre: Sequence[Task[Any] | Call] = (),
    post: Sequence[Task[Any] | Call] = (),
    help: dict[str, str] | None = None,
    role: Role = "work",
) -> Callable[[Callable[..., Note]], LayerkeepTask]:
    """Make a layerkeep task: Invoke's ``@task`` plus the run's bookkeeping."""

    def make(body: Callable[..., Note]) -> LayerkeepTask:
        @functools.wraps(body)
        def run(c: Context, *args: Any, **kwargs: Any) -> str | None:
            return Run.of(c).perform(made, c, lambda: body(c, *args, **kwargs))

        run.__doc__ = "\n\n".join(
            part
            for part in (inspect.cleandoc(body.__doc__ or ""), _graph_line(pre, post))
            if part
        ) + f"\n\n{SETTINGS_POINTER}"

        made = LayerkeepTask(
            run,
            title=title,
            role=role,
            inner=body,
            pre=list(pre),
            post=list(post),
            help=help or {},
        )
        # Announce first (see the module doc); invoke types pre loosely.
        made.pre = cast(Any, [call(_ENTER, entry=_Entry(made)), *pre])
        return made

    return make


def _graph_line(pre: Sequence[Task[Any] | Call], post: Sequence[Task[Any] | Call]) -> str:
    """Where a task sits in the graph, for `inv --help`."""
    parts = []
    if pre:
        parts.append("Runs after: " + ", ".join(title_of(_call_task(i)) for i in pre) + ".")
    if post:
        parts.append("Then: " + ", ".join(title_of(_call_task(i)) for i in post) + ".")
    return " ".join(parts)


class _Entry:
    """The task a hidden first ``pre`` call announces.

    Invoke deep-copies tasks when it loads a collection, and a task's own pre call
    refers back to the task: copying this reference as itself ends the cycle.
    """

    def __init__(self, task: LayerkeepTask) -> None:
        self.task = task

    def __deepcopy__(self, memo: object) -> _Entry:
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Entry) and self.task == other.task

    def __hash__(self) -> int:
        return hash(self.task)


def _enter(c: Context, entry: _Entry) -> None:
    Run.of(c).enter(entry.task, c)


_ENTER: Task[Any] = Task(_enter)


def expansion(task: Task[Any]) -> list[Task[Any]]:
    """The tasks Invoke runs for ``task`` alone, in order (pre, itself, post; deduped)."""
    executor = Executor(Collection())
    calls = executor.dedupe(executor.expand_calls([Call(task)]))
    return [each.task for each in calls if each.task != _ENTER]


def title_of(task: Task[Any]) -> str:
    """The name a task has in the summary."""
    return task.title if isinstance(task, LayerkeepTask) else str(task.name)


def settings(c: Context, **flags: str | None) -> Settings:
    """The run's settings (loaded once, shared by every task), with this task's flags."""
    return Run.of(c).settings(c).with_flags(**flags)


def engine(c: Context, settings: Settings) -> Engine:
    """The run's engine connection for the job ``settings`` describe."""
    return Run.of(c).engine(settings)


def resolved_builder(c: Context, settings: Settings) -> Builder:
    """The run's builder (see :meth:`Run.builder`) for ``settings``."""
    return Run.of(c).builder(settings)


def say_plan(lines: Iterable[str]) -> Note:
    """A dry run's part of a task: say what it would do, do nothing."""
    for line in lines:
        say(line)
    return None


def is_dry(c: Context) -> bool:
    """Whether `inv --dry` asked for a plan instead of changes."""
    return bool(c.config.run.dry)


class Interrupted(BaseException):
    """A termination signal arrived while a task ran."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass(frozen=True)
class Failure:
    """A task's failure as a user sees it: one line and an exit code."""

    line: str
    code: int
    interrupted: bool = False


def describe_failure(error: BaseException) -> Failure:
    """Turn whatever a task raised into one line and an exit code: the one place."""
    if isinstance(error, ENGINE_ERRORS):
        error = translate(error)
    if isinstance(error, LayerkeepError):
        return Failure(error.one_line(), error.exit_code)
    if isinstance(error, Interrupted):
        return Failure(f"interrupted by {error}", 128 + error.signum, interrupted=True)
    if isinstance(error, KeyboardInterrupt):
        return Failure("interrupted by SIGINT", 130, interrupted=True)
    if isinstance(error, UnexpectedExit):
        result = error.result
        return Failure(f"command {result.command!r} exited {result.exited}", result.exited or 1)
    if isinstance(error, Exit):
        return Failure(str(error.message or "stopped"), error.code)
    text = " ".join(str(error).split()) or "no message"
    return Failure(f"{type(error).__name__}: {text[:300]}", 1)


class Run:
    """One `inv` run's shared state, kept on the Invoke config all its tasks share."""

    def __init__(self) -> None:
        self.plan: list[Task[Any]] = []
        self.entries: list[Task[Any]] = []
        self.records: dict[Task[Any], TaskRecord] = {}
        self.cleanups: list[Task[Any]] = []
        self.failing = False
        self.error = ""
        self.dry_announced = False
        self._settings: Settings | None = None
        self._engines: dict[tuple[str, str], Engine] = {}
        self._builders: dict[tuple[str, str, str, str], Builder] = {}
        self._lock: JobLock | None = None
        self._context: Context | None = None
        self._old_handlers: dict[int, Any] = {}
        self._signal_pending: int | None = None

    def __copy__(self) -> Run:
        # Invoke copies config values each time it merges its layers (before every
        # task): the run must stay one object.
        return self

    def __deepcopy__(self, memo: object) -> Run:
        return self

    @classmethod
    def of(cls, c: Context) -> Run:
        """The run of this context's config, made on first use."""
        found = c.config.get(_RUN_KEY)
        if isinstance(found, Run):
            return found
        made = cls()
        c.config[_RUN_KEY] = cast(Any, made)  # invoke types config values as str
        return made

    # The plan -------------------------------------------------------------------

    def enter(self, entry: LayerkeepTask, c: Context) -> None:
        """``entry`` is about to be expanded: add its tasks to the plan if new."""
        self._context = c
        if entry in self.plan:
            return
        self.entries.append(entry)
        self.plan += [task for task in expansion(entry) if task not in self.plan]
        if len(self.entries) == 1 and not is_dry(c):
            self._check_before_start(entry, c)
        if is_dry(c) and not self.dry_announced:
            self.dry_announced = True
            steps = " -> ".join(title_of(t) for t in self.plan if _role(t) != "group")
            say(f"dry run, nothing is changed; plan: {steps}")

    def _check_before_start(self, entry: LayerkeepTask, c: Context) -> None:
        """Stop before any task starts on what layerkeep.preflight finds in the settings."""
        if not needs_preflight({title_of(task) for task in self.plan}):
            return
        try:
            current = self.settings(c)
        except LayerkeepError:
            return  # the first task reports it, in its row of the summary
        tasks = self.entries if current.skip_dependencies else self.plan
        # A flag of the entry task may still set these: the task checks them itself.
        flags = inspect.signature(entry.inner).parameters.keys() & {"image", "builder"}
        try:
            check_before_start(
                current, {title_of(t) for t in tasks}, environ(), flags=flags, log=say
            )
        except LayerkeepError as error:
            self._release()
            failure = describe_failure(error)
            raise Exit(f"layerkeep: {failure.line}", code=failure.code) from None

    def register_cleanup(self, task: Task[Any]) -> None:
        """Run ``task`` if this run fails or is interrupted (e.g. services.down)."""
        if task not in self.cleanups:
            self.cleanups.append(task)

    # Settings and the job's build id ----------------------------------------------

    def settings(self, c: Context) -> Settings:
        """The settings, loaded once per run; the build id is locked for the run."""
        if self._settings is None:
            loaded = load_project_settings(c)
            if not is_dry(c):
                loaded = self._lock_build_id(loaded)
            self._settings = loaded
        return self._settings

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

    def keep_flags(self, c: Context, **flags: str | None) -> None:
        """Apply ``flags`` to the settings of every task after this one in the run."""
        self._settings = self.settings(c).with_flags(**flags)

    def _lock_build_id(self, settings: Settings) -> Settings:
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
        self._lock = lock
        if lock.build_id == settings.build_id:
            return settings
        say(
            f"build id {settings.build_id!r} is in use by another run on this engine; "
            f"this run uses {lock.build_id!r}"
        )
        return replace(settings, build_id=lock.build_id)

    # Running a task -----------------------------------------------------------------

    def perform(self, task: LayerkeepTask, c: Context, body: Callable[[], Note]) -> str | None:
        """Run one task's body, record it, and stop the run cleanly if it fails."""
        if task not in self.plan:  # called directly, not through Invoke's expansion
            self.enter(task, c)
        self._arm_signals()
        if task.role != "group":
            say(f"==> {task.title}{' (cleanup)' if self.failing else ''}")
        started, wall = time.monotonic(), time.time()
        try:
            note = Skipped("LAYERKEEP_SKIP_DEPENDENCIES") if self._skips(task, c) else body()
        except BaseException as error:
            self._failed(task, error, time.monotonic() - started, wall)
            return None
        seconds = time.monotonic() - started
        result: Result = "ok"
        text = ""
        figures: Mapping[str, Any] = {}
        if isinstance(note, Skipped):
            result, text = "skipped", note.reason
        elif is_dry(c):
            result = "would run"
        elif isinstance(note, Done):
            text, figures = note.note, note.figures
        elif note:
            text = note
        self.records[task] = TaskRecord(
            task.title, result, seconds, text, self.failing, wall, figures
        )
        if not self.failing and self._plan_done():
            self._finish()
        return text

    def _skips(self, task: LayerkeepTask, c: Context) -> bool:
        """A task the entries depend on, when the user asked to run only the entries."""
        if task in self.entries or task.role == "group" or self.failing:
            return False
        return self.settings(c).skip_dependencies

    def _failed(
        self, task: LayerkeepTask, error: BaseException, seconds: float, wall: float
    ) -> None:
        failure = describe_failure(error)
        if self.failing:  # a cleanup step failed: report it beside the first error
            self.records[task] = TaskRecord(
                task.title, "failed", seconds, failure.line, True, wall
            )
            say(f"warning: cleanup {task.title} failed: {failure.line}")
            return
        if task.role == "cache" and task not in self.entries and not failure.interrupted:
            self.records[task] = TaskRecord(task.title, "warn", seconds, failure.line, False, wall)
            say(f"warning: {task.title}: {failure.line} (the job goes on without it)")
            if self._plan_done():
                self._finish()
            return
        self.records[task] = TaskRecord(task.title, "failed", seconds, failure.line, False, wall)
        self.error = f"{task.title}: {failure.line}"
        self._clean_up()
        self._finish()
        sys.stdout.flush()
        raise Exit(f"layerkeep: {task.title}: {failure.line}", code=failure.code) from None

    def _clean_up(self) -> None:
        """Run the plan's cleanup tasks and the registered ones; signals wait meanwhile.

        Without settings (they did not load, or another run holds the build id) this
        run cannot have started anything, and must not touch what another run owns.
        """
        self.failing = True
        if self._settings is None:
            return
        pending = [t for t in self.plan if _role(t) == "cleanup" and t not in self.records]
        pending += [t for t in self.cleanups if t not in self.records and t not in pending]
        context = self._context
        if context is None:
            return
        self._hold_signals()
        for task in pending:
            task(context)

    def _plan_done(self) -> bool:
        return all(task in self.records for task in self.plan)

    def _finish(self) -> None:
        rows = self.summary_rows()
        if len(rows) > 1 or self.failing:
            say("")
            say(format_summary(rows))
        self._publish(rows)
        self._release()

    def _publish(self, rows: list[TaskRecord]) -> None:
        """The JSON report in the reports folder; the CI's job summary where it has one."""
        current, context = self._settings, self._context
        if current is None or context is None or is_dry(context):
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

    def summary_rows(self) -> list[TaskRecord]:
        """The plan's rows in order (not run where Invoke stopped), then extra cleanups."""
        rows = [
            self.records.get(task, TaskRecord(title_of(task), "not run"))
            for task in self.plan
            if _role(task) != "group"
        ]
        rows += [
            record
            for task, record in self.records.items()
            if task not in self.plan and _role(task) != "group"
        ]
        return rows

    def _release(self) -> None:
        for connected in self._engines.values():
            connected.close()
        self._engines = {}
        self._builders = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._settings = None
        self._restore_signals()

    # Signals ------------------------------------------------------------------------

    def _arm_signals(self) -> None:
        """SIGTERM (what CI sends on cancel) interrupts the task like SIGINT does."""
        if self._old_handlers or threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNAL_CODES:
            self._old_handlers[signum] = signal.signal(signum, _interrupt)

    def _hold_signals(self) -> None:
        """During cleanup a signal is noted, not acted on: cleanup must finish."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNAL_CODES:
            signal.signal(signum, self._note_signal)

    def _note_signal(self, signum: int, _: FrameType | None) -> None:
        self._signal_pending = signum
        say(f"{signal.Signals(signum).name} received: finishing cleanup first")

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}


def _interrupt(signum: int, _: FrameType | None) -> None:
    raise Interrupted(signum)


def _role(task: Task[Any]) -> Role:
    return task.role if isinstance(task, LayerkeepTask) else "work"


def with_steps(group: LayerkeepTask, steps: Iterable[tuple[Task[Any], str]]) -> LayerkeepTask:
    """A new ``group`` task whose pre list has each step right after the task it names."""
    pre = [item for item in _pre(group) if _call_task(item) != _ENTER]
    for project_task, after in steps:
        task = as_step(project_task)
        titles = [title_of(_call_task(item)) for item in pre]
        if after not in titles:
            raise LayerkeepError(
                f"cannot add {task.name!r} after {after!r}: {group.title} has no such task",
                hint=f"its tasks: {', '.join(titles)}",
            )
        pre.insert(titles.index(after) + 1, task)
    return step(group.title, pre=pre, post=_post(group), help=dict(group.help), role=group.role)(
        group.inner
    )


def as_step(task: Task[Any]) -> LayerkeepTask:
    """A project's task as a layerkeep step: in the summary, cleanup after its failure."""
    if isinstance(task, LayerkeepTask):
        return task
    return step(str(task.name), pre=_pre(task), post=_post(task), help=dict(task.help))(
        task.body
    )


def _pre(task: Task[Any]) -> list[Task[Any] | Call]:
    return cast(list[Task[Any] | Call], task.pre)  # invoke types it as list[str]


def _post(task: Task[Any]) -> list[Task[Any] | Call]:
    return cast(list[Task[Any] | Call], task.post)


def _call_task(item: Task[Any] | Call) -> Task[Any]:
    return item.task if isinstance(item, Call) else item
