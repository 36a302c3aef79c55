"""A run's settings: loaded once, every named task's flags on top, the build id locked.

A flag holds for every task of the command (``inv image.build --image X`` restores X in
cache.load too), so the flags of the tasks named on the command line are gathered
before anything runs; one flag given two values is an error. A run that works for the
job locks its build id on this engine for the whole run (core.joblock).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace

from invoke.config import Config
from invoke.tasks import Call

from layerkeep.core.errors import ConfigError
from layerkeep.core.joblock import JobLock, hold_build_id
from layerkeep.core.settings import FLAGS, Key, Settings

from .layerkeep_task import LayerkeepTask
from .taskkit import environ, load_project_settings, say


class RunSettings:
    """The settings of one run (see the module doc); ``lock``: whether the run works
    for the job, so its build id is locked (never in a dry run)."""

    def __init__(self, config: Config, *, lock: bool) -> None:
        self.config = config
        self.locks = lock
        self.flags: dict[str, tuple[str, str]] = {}
        self.loaded: Settings | None = None
        self.current: Settings | None = None
        self._lock: JobLock | None = None

    def take_flags(self, named: Sequence[Call]) -> None:
        """The setting flags of the tasks named on the command line."""
        self.flags = _named_flags(named)

    def resolve(self) -> Settings:
        """The settings, loaded once per run, with the flags; the build id is locked
        the first time for a run that works for the job."""
        if self.current is None:
            if self.loaded is None:
                self.loaded = load_project_settings(self.config)
            current = _with_flags(self.loaded, self.flags)
            if self.locks and self._lock is None:
                self._lock = _lock_build_id(current)
            # Flags resolve the settings again, from what was loaded: the locked id
            # goes on top each time.
            if self._lock is not None and self._lock.build_id != current.build_id:
                current = replace(current, build_id=self._lock.build_id)
            self.current = current
        return self.current

    @contextmanager
    def flags_for(self, title: str, given: Mapping[str, object]) -> Iterator[None]:
        """Flags a task was called with directly (from another task's body), for that
        call only; those the command line gave already are no change."""
        keys = {key.field: key for key in _flag_keys(given)}
        new = {
            name: (text, title)
            for name, key in keys.items()
            if (text := key.flag_text(given[key.param])) is not None
            and self.flags.get(name, ("", ""))[0] != text
        }
        if not new:
            yield
            return
        saved = self.flags, self.current
        self.flags = {**self.flags, **new}
        self.current = None
        try:
            yield
        finally:
            self.flags, self.current = saved

    def release(self) -> None:
        """Unlock the build id, if this run locked it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _lock_build_id(settings: Settings) -> JobLock:
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
