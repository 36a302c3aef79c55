"""Registry failures: sorted by the engine's text, retried with backoff, told in one line.

Failures are sorted by the engine's text, because push and pull report them in-band and
the engine answers 500 for most registry problems whatever the registry said:

- authentication ("unauthorized", "authentication required", "denied", "no basic auth
  credentials"): raised at once as :class:`RegistryAuthError`, never retried;
- transient (connection refused or reset, timeouts and deadlines, EOF, a registry 5xx):
  retried with exponential backoff (1 s, 2 s, 4 s, ...) up to ``attempts`` tries in all
  (LAYERKEEP_PUSH_RETRIES), within ``time_limit`` seconds in all (LAYERKEEP_PUSH_TIMEOUT:
  the attempt running at the limit is stopped, and the engine cancels its transfer; no
  attempt starts when its backoff would end past the limit), then raised as
  :class:`RegistryUnavailable`, whose one line says how many attempts over how long. A
  registry that is up but fails layer uploads is retried by the engine itself first (5
  tries per layer, about 50 s, counting down each second): that is said in one line per
  attempt. A registry that accepts connections and never answers costs the engine 25 s
  per attempt (10 s for HTTPS, 15 s for HTTP); refused connections fail at once;
- a tag the registry does not have: :class:`TagNotFound`;
- anything else: :class:`~layerkeep.errors.DockerOperationError` at once.

The password never reaches a message: every text we log or raise goes through
:meth:`~layerkeep.core.registry_credentials.Credentials.redact` first (engine errors
can echo credentials inside URLs).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from layerkeep.core.engine import TimeLimitReached
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.log import Log
from layerkeep.core.registry_credentials import Credentials
from layerkeep.core.settings import Settings

Sleep = Callable[[float], None]
T = TypeVar("T")
FIRST_DELAY = 1.0

_AUTH = re.compile(
    r"unauthorized|authentication required|no basic auth credentials|denied:"
    r"|access to the resource is denied|access denied|incorrect username or password",
    re.IGNORECASE,
)
_TRANSIENT = re.compile(
    r"connection refused|connection reset|broken pipe|timeout|timed out|deadline exceeded"
    r"|\bEOF\b"
    r"|unexpected HTTP status: 5\d\d|service unavailable|bad gateway|too many requests",
    re.IGNORECASE,
)
_MISSING = re.compile(r"manifest unknown|not found|name unknown|not known to registry", re.I)
Failure = Literal["auth", "transient", "missing", "other"]
# What an engine says when it cannot reach any registry: DNS fails, or no route.
_UNREACHABLE = re.compile(
    r"lookup (?P<host>[\w.-]+)(?: on [\w.:\[\]-]+)?: (?P<why>no such host|server misbehaving"
    r"|temporary failure in name resolution)|(?P<route>network is unreachable)",
    re.IGNORECASE,
)
OFFLINE_HINT = (
    "no registry is reachable from this machine: `inv standins.build` builds stand-ins of "
    "python:3.11-slim, postgres:15, redis:7 and registry:2 from Debian packages, or "
    "cache.load restores images saved elsewhere (LAYERKEEP_CACHE_IMAGES)"
)


class RegistryAuthError(DockerOperationError):
    """The registry refused our credentials (or we had none): retrying cannot help."""


class RegistryUnavailable(DockerOperationError):
    """The registry could not be reached, or kept failing, through every attempt."""

    def __init__(self, message: str, *, image: str, attempts: int, hint: str = "") -> None:
        super().__init__(message, image=image, hint=hint)
        self.attempts = attempts


class TagNotFound(DockerOperationError):
    """The registry has no such tag (a cache never saved, a typo)."""



@dataclass(frozen=True)
class Retries:
    """How a registry call is tried: ``attempts`` tries in all within ``time_limit``
    seconds, each retry said to ``log`` and waited out with ``sleep``."""

    attempts: int
    log: Log
    time_limit: float | None = None
    sleep: Sleep = time.sleep

    @classmethod
    def of(cls, settings: Settings, log: Log, sleep: Sleep = time.sleep) -> Retries:
        """LAYERKEEP_PUSH_RETRIES attempts within LAYERKEEP_PUSH_TIMEOUT seconds."""
        return cls(settings.push_retries, log, settings.push_timeout, sleep)

    def run(
        self, call: Callable[[float | None], T], *, action: str, reference: str,
        credentials: Credentials,
    ) -> tuple[T, int]:
        """:func:`with_retries` with these attempts, time limit, log and sleep."""
        return with_retries(
            call, action=action, reference=reference, credentials=credentials,
            attempts=self.attempts, time_limit=self.time_limit, log=self.log, sleep=self.sleep,
        )


def unreachable_registry(text: str) -> str | None:
    """Why no registry could be reached, when the engine's ``text`` says so; else None."""
    found = _UNREACHABLE.search(text)
    if found is None:
        return None
    if found["route"]:
        return "network is unreachable"
    return f"lookup {found['host']}: {found['why']}"


def classify(text: str, status: int | None = None) -> Failure:
    """Sort an engine or registry failure by its text (and the engine's HTTP status)."""
    if _AUTH.search(text):
        return "auth"
    if _TRANSIENT.search(text):
        return "transient"
    if status == 404 or _MISSING.search(text):
        return "missing"
    if status is not None and status >= 500:
        return "transient"
    return "other"


def with_retries(
    call: Callable[[float | None], T],
    *,
    action: str,
    reference: str,
    credentials: Credentials,
    attempts: int,
    time_limit: float | None = None,
    log: Log,
    sleep: Sleep = time.sleep,
) -> tuple[T, int]:
    """Run ``call`` until it succeeds, retrying transient failures with backoff.

    ``call`` gets the deadline (a ``time.monotonic()`` value; None without a
    ``time_limit``) to hand to the engine, which stops there. Returns the result and
    the number of attempts it took.
    """
    started = time.monotonic()
    deadline = None if time_limit is None else started + time_limit
    delay = FIRST_DELAY
    earlier = ""
    for attempt in range(1, attempts + 1):
        attempt_started = time.monotonic()
        try:
            return call(deadline), attempt
        except TimeLimitReached:
            text = f"stopped at the {time_limit:g} s time limit"
            if earlier:
                text += f"; attempt {attempt - 1} failed with: {earlier}"
            raise _unavailable(
                action, reference, text, credentials=credentials, attempts=attempt,
                seconds=time.monotonic() - started,
            ) from None
        except DockerOperationError as error:
            # The engine's own "push REF failed: " prefix; ours goes back on below.
            text = error.message.removeprefix(f"{action} {reference} failed: ")
            status = error.status
        text = credentials.redact(_short(text))
        kind = classify(text, status)
        if kind == "auth":
            raise auth_failed(credentials, action, reference, text) from None
        if kind == "missing" and action != "push":
            raise TagNotFound(
                f"{action} {reference}: no such tag in {credentials.registry}", image=reference
            ) from None
        if kind in ("other", "missing"):
            raise DockerOperationError(
                f"{action} {reference} failed: {text}", image=reference
            ) from None
        now = time.monotonic()
        if deadline is not None and attempt < attempts and now + delay >= deadline:
            text += f"; another attempt would start past the {time_limit:g} s time limit"
        elif attempt < attempts:
            log(
                f"{action} {reference}: attempt {attempt}/{attempts} failed after "
                f"{now - attempt_started:.0f} s ({text}); retrying in {delay:g} s"
            )
            earlier = text
            sleep(delay)
            delay *= 2
            continue
        raise _unavailable(
            action, reference, text, credentials=credentials, attempts=attempt,
            seconds=now - started,
        )
    raise AssertionError("unreachable: attempts is at least 1")  # pragma: no cover


def _unavailable(
    action: str,
    reference: str,
    text: str,
    *,
    credentials: Credentials,
    attempts: int,
    seconds: float,
) -> RegistryUnavailable:
    """The one-line error for a registry that kept failing: attempts, time, last reason."""
    return RegistryUnavailable(
        f"{action} {reference} failed after {attempts} attempt{'s' if attempts > 1 else ''} "
        f"in {seconds:.0f} s: {text}",
        image=reference,
        attempts=attempts,
        hint=f"is {credentials.registry} up and reachable from the Docker engine? "
        "LAYERKEEP_PUSH_RETRIES sets the attempts, LAYERKEEP_PUSH_TIMEOUT the time limit",
    )


def auth_failed(
    credentials: Credentials, action: str, reference: str, text: str
) -> RegistryAuthError:
    """The one-line error for refused credentials, saying what to do."""
    if credentials.user:
        hint = (
            "check LAYERKEEP_REGISTRY_USER and LAYERKEEP_REGISTRY_PASSWORD; a token needs "
            f"{'push' if action == 'push' else 'read'} access to this repository"
        )
    else:
        hint = (
            f"run `docker login {credentials.registry}` on this machine, or set "
            "LAYERKEEP_REGISTRY_USER and LAYERKEEP_REGISTRY_PASSWORD"
        )
    return RegistryAuthError(
        f"authentication failed for {credentials.registry} ({credentials.who()}) "
        f"on {action} {reference}: {text}",
        image=reference,
        hint=hint,
    )


def _short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:300]

