"""docker-py's and requests' errors become ours here, as one line each.

:func:`translate` is the one place an engine error turns into a DockerOperationError (or
its 404 and 409 kinds); :func:`checked_stream` raises the errors engines report inside
a 200 stream (push, pull, load and build).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import docker.errors
import requests.exceptions
import urllib3.exceptions

from layerkeep.core.errors import DockerOperationError, ResourceConflict, ResourceNotFound

# What docker-py raises (requests' errors escape it for lost connections and timeouts):
# the task layer's last resort catches these and passes them to translate().
ENGINE_ERRORS: tuple[type[Exception], ...] = (
    docker.errors.DockerException,
    requests.exceptions.RequestException,
)
# Reading a stream can also raise urllib3's own errors (a read timeout, a cut connection).
STREAM_ERRORS: tuple[type[Exception], ...] = (*ENGINE_ERRORS, urllib3.exceptions.HTTPError)


def translate(
    error: BaseException,
    *,
    action: str = "",
    resource: str = "",
    image: str = "",
    hint: str = "",
) -> DockerOperationError:
    """The one place a docker-py or requests error becomes ours, as one line.

    404 becomes ResourceNotFound and 409 ResourceConflict, both naming ``resource``; the
    engine's own explanation is kept (its status too), so a 409 on a name clash says which
    container holds the name.
    """
    status: int | None = None
    if isinstance(error, docker.errors.APIError):
        status = error.status_code
        explanation = error.explanation
        if isinstance(explanation, bytes):
            explanation = explanation.decode(errors="replace")
        detail = str(explanation) if explanation else str(error)
    elif isinstance(error, requests.exceptions.RequestException):
        detail = f"{type(error).__name__}: {error}"
    else:
        detail = str(error) or type(error).__name__
    # One line: engines explain across lines, and requests nests reasons.
    detail = " ".join(detail.split())
    message = f"{action} failed: {detail}" if action else f"the Docker engine failed: {detail}"
    if status == 404:
        return ResourceNotFound(message, resource=resource, image=image, hint=hint)
    if status == 409:
        return ResourceConflict(message, resource=resource, image=image, hint=hint)
    return DockerOperationError(message, image=image, hint=hint, status=status)


@contextmanager
def translated(
    action: str, *, resource: str = "", image: str = "", hint: str = ""
) -> Iterator[None]:
    """Raise what the block's engine calls raise as :func:`translate` words it."""
    try:
        yield
    except ENGINE_ERRORS as error:
        raise translate(
            error, action=action, resource=resource, image=image, hint=hint
        ) from error


def checked_stream(
    chunks: Iterable[Mapping[str, Any]], *, action: str, image: str
) -> Iterator[Mapping[str, Any]]:
    """Pass decoded stream records through, raising on the errors engines send in-band.

    Push, pull, load and build answer 200 and report failure inside the stream. The
    stream is read to its end before raising, so its connection is released.
    """
    records = iter(chunks)
    for chunk in records:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail") or {}
            message = str(chunk.get("error") or detail.get("message") or "unknown error")
            for _ in records:
                pass
            raise DockerOperationError(f"{action} {image} failed: {message.strip()}", image=image)
        yield chunk


def first_line(error: BaseException) -> str:
    """The first line of an error's text (its type's name when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
