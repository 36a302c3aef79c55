"""What a layerkeep task is: a title for the summary, a role in the run, the setting
flags it takes, and what it returns (a note, figures, or why it had nothing to do)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from invoke.tasks import Task

from layerkeep.core.settings import Key

Role = Literal["work", "cache", "cleanup", "group"]


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
