"""Engine requests that stop at a deadline (a ``time.monotonic()`` value).

The engine goes on with a push or pull while its client listens (and retries a failing
layer upload itself for about 50 s), and cancels it once the client hangs up; so at the
deadline the request's connection is shut down, and TimeLimitReached raised.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import suppress
from typing import Any, TypeVar

import docker
import requests

from layerkeep.core.engine.translation import (
    ENGINE_ERRORS,
    STREAM_ERRORS,
    checked_stream,
    translate,
)
from layerkeep.core.errors import DockerOperationError

T = TypeVar("T")


class TimeLimitReached(DockerOperationError):
    """An engine request stopped at its deadline (the engine cancels it)."""


def limited_call(
    api: docker.APIClient,
    call: Callable[[docker.APIClient], T],
    *,
    deadline: float,
    action: str,
    image: str,
) -> T:
    """``call(api)``, stopped at ``deadline``; its errors are left to the caller."""
    with TimeLimit(api, deadline, action=action, image=image) as limit:
        try:
            answer = call(limit.api)
        except ENGINE_ERRORS:
            limit.finish(failed=True)
            raise
        limit.finish(failed=False)
    return answer


def limited_stream(
    api: docker.APIClient,
    open_stream: Callable[[docker.APIClient], Iterable[Mapping[str, Any]]],
    *,
    deadline: float,
    action: str,
    image: str,
) -> Iterator[Mapping[str, Any]]:
    """The records of the stream ``open_stream(api)`` opens (in-band errors raised) until
    ``deadline``; an error reading it is translated."""
    with TimeLimit(api, deadline, action=f"{action} {image}", image=image) as limit:
        try:
            for chunk in checked_stream(open_stream(limit.api), action=action, image=image):
                if limit.reached():
                    limit.cut()
                    break
                yield chunk
        except STREAM_ERRORS as error:
            # A cut connection ends the stream with whatever error it causes.
            limit.finish(failed=True)
            raise translate(error, action=f"{action} {image}", image=image) from error
        limit.finish(failed=False)


class TimeLimit:
    """Stops one engine request at ``deadline``: :attr:`api` is the client to make it with.

    That client is a copy of the given one, sharing its connection pool, whose requests
    have a socket timeout no longer than the time left (for a request that gets no
    answer at all) and are kept, to find the connection to shut down at the deadline.
    """

    def __init__(self, api: docker.APIClient, deadline: float, *, action: str, image: str):
        self.deadline = deadline
        self._message = f"{action} failed: stopped at the time limit"
        self._image = image
        self.api = _LimitedClient.copy_of(api, self)
        self._responses: list[requests.Response] = []
        self._lock = threading.Lock()
        self._cut = False
        self._done = False
        self._timer = threading.Timer(max(self.left(), 0.001), self.cut)
        self._timer.daemon = True

    def left(self) -> float:
        """Seconds until the deadline (negative once it passed)."""
        return self.deadline - time.monotonic()

    def reached(self) -> bool:
        """Whether the deadline has passed."""
        return self.left() <= 0

    def keep(self, response: requests.Response) -> None:
        """Remember a response of the request, to shut its connection down at the deadline."""
        self._responses.append(response)

    def cut(self) -> None:
        """Shut the request's connection down, unless the request already ended."""
        with self._lock:
            if self._done or self._cut:
                return
            self._cut = True
            for response in self._responses:
                connection = getattr(response.raw, "connection", None)
                sock = getattr(connection, "sock", None)
                if isinstance(sock, socket.socket):
                    with suppress(OSError):  # closed already
                        sock.shutdown(socket.SHUT_RDWR)

    def finish(self, *, failed: bool) -> None:
        """End the request; raise TimeLimitReached if it was cut, or ``failed`` late.

        A request that ended well just as the deadline passed stands.
        """
        with self._lock:
            self._done = True
            stopped = self._cut or (failed and self.reached())
        if stopped:
            raise TimeLimitReached(self._message, image=self._image)

    def __enter__(self) -> TimeLimit:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        with self._lock:
            self._done = True
            cut = self._cut
        self._timer.cancel()
        if cut:
            # Shut down is not closed: close it here, once no one reads from it.
            for response in self._responses:
                response.close()


class _LimitedClient(docker.APIClient):  # type: ignore[misc]  # docker-py is untyped
    """A docker-py client whose requests a :class:`TimeLimit` bounds.

    Every request goes through requests' ``Session.send``, which docker-py's client is:
    here it gets the time left as its socket timeout (docker-py asks for none at all on
    pulls: the engine answers a pull only once the registry has), and its response is
    kept by the limit.
    """

    limit: TimeLimit

    @classmethod
    def copy_of(cls, api: docker.APIClient, limit: TimeLimit) -> _LimitedClient:
        """A copy of ``api`` sharing its connection pool (no new connection is set up)."""
        # A shallow copy: Session.__getstate__ (what copy.copy uses) drops docker-py's
        # own attributes (base URL, API version, timeout).
        copy: _LimitedClient = object.__new__(cls)
        copy.__dict__.update(api.__dict__)
        copy.limit = limit
        return copy

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        kwargs["timeout"] = max(self.limit.left(), 0.001)
        response: requests.Response = super().send(request, **kwargs)
        self.limit.keep(response)
        return response
