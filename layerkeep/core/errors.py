"""The one family of errors layerkeep raises; each carries what a user needs to act."""

from __future__ import annotations

from collections.abc import Sequence


class LayerkeepError(Exception):
    """Root of every error layerkeep reports to a user as one line."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and its hint on one line, as a user sees it."""
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(LayerkeepError):
    """A setting, an env file line or a flag is not valid."""

    exit_code = 2

    def __init__(self, message: str, *, key: str = "", source: str = "", hint: str = "") -> None:
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}", hint=hint)
        self.key = key
        self.source = source


class EngineUnavailable(LayerkeepError):
    """The Docker engine cannot be reached."""

    exit_code = 3


class DockerOperationError(LayerkeepError):
    """The engine refused or failed an operation (build, push, pull, load, run).

    ``status`` is the engine's HTTP status when it answered one (None for in-band stream
    errors and lost connections).
    """

    def __init__(
        self, message: str, *, image: str = "", hint: str = "", status: int | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        self.image = image
        self.status = status


class ResourceNotFound(DockerOperationError):
    """The engine has no such container, network, image or exec (404)."""

    def __init__(self, message: str, *, resource: str, image: str = "", hint: str = "") -> None:
        super().__init__(message, image=image, hint=hint, status=404)
        self.resource = resource


class ResourceConflict(DockerOperationError):
    """The engine refused because of a resource's state (409): name in use, not running."""

    def __init__(self, message: str, *, resource: str, image: str = "", hint: str = "") -> None:
        super().__init__(message, image=image, hint=hint, status=409)
        self.resource = resource


class BuildFailed(DockerOperationError):
    """A build step failed; carries the step and the last lines of output."""

    TAIL_LINES = 20  # how many of the builder's last lines a failure keeps

    def __init__(self, message: str, *, image: str, last_lines: list[str]) -> None:
        super().__init__(message, image=image)
        self.last_lines = last_lines

    @classmethod
    def from_output(
        cls, what: str, *, image: str, exit_code: int, tail: Sequence[str]
    ) -> BuildFailed:
        """``<what> failed (exit N): <the last line of tail that mentions an error>``."""
        reason = next((line for line in reversed(tail) if "error" in line.lower()), "")
        return cls(
            f"{what} failed (exit {exit_code}): {reason.strip()}",
            image=image,
            last_lines=list(tail),
        )


class GitError(LayerkeepError):
    """git failed or the folder is not a usable repository."""


class CommandFailed(LayerkeepError):
    """A command the user configured exited non-zero; its code becomes ours."""

    def __init__(self, message: str, *, return_code: int) -> None:
        super().__init__(message)
        self.exit_code = return_code
