"""A task's failure as a user sees it: one line and an exit code, whatever was raised."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from invoke.exceptions import Exit, UnexpectedExit

from layerkeep.core.engine import ENGINE_ERRORS, translate
from layerkeep.core.errors import LayerkeepError


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
