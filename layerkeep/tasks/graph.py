"""The task graph is Invoke's own ``pre``/``post``; :func:`step` makes a task of it.

Every layerkeep task is made with :func:`step`: Invoke's ``@task`` plus a title for
the summary, a role in the run (``work``; ``cache``, whose failure only warns when it
serves another task; ``cleanup``, run after a failure too; ``group``, no row of its
own), and the setting flags it takes. Invoke expands each command's ``pre`` and
``post``; :class:`~.executor.LayerkeepExecutor` plans the result (each task once) and
runs it as one :class:`~.run.Run`: the lock, the checks before start, one line per
failure, cleanup, signals, the summary and the report.

A task flag is declared once, with its setting (``setting(..., flag="--image")`` in
core/settings/declarations.py): its help text comes from the setting's doc, and the
executor applies the flags of every task named in a command to that command's settings,
so that ``inv image.build --image X`` also restores X in cache.load, its prerequisite.

Task bodies reach the run through the helpers here: :func:`settings`, :func:`engine`,
:func:`resolved_builder`, :func:`register_cleanup`, :func:`is_dry`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, cast

from invoke.collection import Collection
from invoke.context import Context
from invoke.tasks import Call, Task

from layerkeep.building.builder import Builder
from layerkeep.core.engine import Engine
from layerkeep.core.errors import LayerkeepError
from layerkeep.core.settings import FLAGS, Key, Settings

from .executor import LayerkeepExecutor
from .layerkeep_task import Done, LayerkeepTask, Note, Role, Skipped, title_of
from .run import run_of
from .taskkit import say

__all__ = [
    "Done",
    "LayerkeepTask",
    "Note",
    "Skipped",
    "engine",
    "expansion",
    "is_dry",
    "register_cleanup",
    "resolved_builder",
    "say_plan",
    "settings",
    "step",
    "title_of",
    "with_steps",
]

SETTINGS_POINTER = (
    "Settings are LAYERKEEP_* keys in layerkeep.env, .env or the environment: "
    "`inv settings` shows each value and where it came from."
)


def step(
    title: str,
    *,
    pre: Sequence[Task[Any] | Call] = (),
    post: Sequence[Task[Any] | Call] = (),
    flags: Sequence[str] = (),
    help: Mapping[str, str] | None = None,
    role: Role = "work",
    uses_job: bool = True,
) -> Callable[[Callable[..., Note]], LayerkeepTask]:
    """Make a layerkeep task: Invoke's ``@task`` with a title, a role and setting flags.

    ``flags`` names setting flags (``"--image"``, see ``FLAGS`` in
    core/settings/declarations.py): the task takes them, with help from the setting's
    doc, and the body does not (it reads the run's settings). ``help`` is for the body's
    own parameters. ``uses_job``: the task works for the job (settings loaded before the
    run, build id locked); only a read-only view says no.
    """
    keys = [FLAGS[flag] for flag in flags]

    def make(body: Callable[..., Note]) -> LayerkeepTask:
        signature = _with_flag_parameters(inspect.signature(body), keys)
        params = [key.param for key in keys]

        @functools.wraps(body)
        def run(c: Context, *args: Any, **kwargs: Any) -> Note:
            current = run_of(c, title)
            given = {name: kwargs.pop(name) for name in params if name in kwargs}
            with current.flags_for(title, given):
                return body(c, *args, **kwargs)

        run.__signature__ = signature  # type: ignore[attr-defined]  # what Invoke parses
        run.__doc__ = "\n\n".join(
            part
            for part in (inspect.cleandoc(body.__doc__ or ""), _graph_line(pre, post))
            if part
        ) + f"\n\n{SETTINGS_POINTER}"
        return LayerkeepTask(
            run,
            title=title,
            role=role,
            inner=body,
            flags=keys,
            uses_job=uses_job,
            pre=list(pre),
            post=list(post),
            help={**{key.param: key.flag_help for key in keys}, **(help or {})},
        )

    return make


def _with_flag_parameters(signature: inspect.Signature, keys: Sequence[Key]) -> inspect.Signature:
    """The body's signature with the setting flags as parameters after its own: what
    Invoke parses (a switch for a yes/no setting, else a value)."""
    own = list(signature.parameters.values())
    names = [key.param for key in keys]
    if set(names) & set(signature.parameters) or any(
        p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in own
    ):
        raise TypeError(
            f"a step's body takes neither its setting flags ({', '.join(names)}) nor "
            "*args/**kwargs: it reads the run's settings"
        )
    added = [
        inspect.Parameter(
            key.param, inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=False if key.switch else None,
        )
        for key in keys
    ]
    return signature.replace(parameters=[*own, *added])


def _graph_line(pre: Sequence[Task[Any] | Call], post: Sequence[Task[Any] | Call]) -> str:
    """Where a task sits in the graph, for `inv --help`."""
    parts = []
    if pre:
        parts.append("Runs after: " + ", ".join(title_of(_call_task(i)) for i in pre) + ".")
    if post:
        parts.append("Then: " + ", ".join(title_of(_call_task(i)) for i in post) + ".")
    return " ".join(parts)


def expansion(task: Task[Any]) -> list[Task[Any]]:
    """The tasks `inv` runs for ``task`` alone, in order, each once."""
    return [call.task for call in LayerkeepExecutor(Collection()).plan([Call(task)])]


# What task bodies call ---------------------------------------------------------------


def settings(c: Context) -> Settings:
    """The run's settings: loaded once, with every flag of the command, build id locked."""
    return run_of(c).settings()


def engine(c: Context, settings: Settings) -> Engine:
    """The run's engine connection for the job ``settings`` describe."""
    return run_of(c).engines.engine(settings)


def resolved_builder(c: Context, settings: Settings) -> Builder:
    """The run's builder (see :meth:`RunEngines.builder`) for ``settings``."""
    return run_of(c).engines.builder(settings)


def register_cleanup(c: Context, task: Task[Any]) -> None:
    """Run ``task`` if this run fails or is interrupted (services.up registers
    services.down as soon as it starts anything)."""
    run_of(c).register_cleanup(task)


def say_plan(lines: Iterable[str]) -> Note:
    """A dry run's part of a task: say what it would do, do nothing."""
    for line in lines:
        say(line)
    return None


def is_dry(c: Context) -> bool:
    """Whether `inv --dry` asked for a plan instead of changes."""
    return bool(c.config.run.dry)


# Project steps -------------------------------------------------------------------------


def with_steps(group: LayerkeepTask, steps: Iterable[tuple[Task[Any], str]]) -> LayerkeepTask:
    """A new ``group`` task whose pre list has each step right after the task it names."""
    pre = list(_pre(group))
    for project_task, after in steps:
        titles = [title_of(_call_task(item)) for item in pre]
        if after not in titles:
            raise LayerkeepError(
                f"cannot add {project_task.name!r} after {after!r}: {group.title} has no such "
                "task",
                hint=f"its tasks: {', '.join(titles)}",
            )
        pre.insert(titles.index(after) + 1, project_task)
    flag_params = {key.param for key in group.flags}
    own_help = {name: text for name, text in group.help.items() if name not in flag_params}
    return step(
        group.title,
        pre=pre,
        post=_post(group),
        flags=[key.flag for key in group.flags],
        help=own_help,
        role=group.role,
        uses_job=group.uses_job,
    )(group.inner)


def _pre(task: Task[Any]) -> list[Task[Any] | Call]:
    return cast(list[Task[Any] | Call], task.pre)  # invoke types it as list[str]


def _post(task: Task[Any]) -> list[Task[Any] | Call]:
    return cast(list[Task[Any] | Call], task.post)


def _call_task(item: Task[Any] | Call) -> Task[Any]:
    return item.task if isinstance(item, Call) else item
