"""Registry primitives: credentials, push and pull of one tag with retries, digests.

Credentials come from the settings (``LAYERKEEP_REGISTRY_USER``/``_PASSWORD``), sent only
to ``LAYERKEEP_REGISTRY``; without a user docker-py sends what ``~/.docker/config.json``
holds for that registry, so an earlier ``docker login`` works.

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

The password never leaves this module in clear: every text we log or raise goes through
:meth:`Credentials.redact` first (engine errors can echo credentials inside URLs).
"""

from __future__ import annotations

import hashlib
import re
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from layerkeep.core.engine import Engine, TimeLimitReached
from layerkeep.core.errors import ConfigError, DockerOperationError
from layerkeep.core.imageref import ImageRef, is_valid_tag
from layerkeep.core.job import Masker
from layerkeep.core.progress import Meter, MeterFactory, silent
from layerkeep.core.settings import Settings

Log = Callable[[str], None]
Sleep = Callable[[float], None]
T = TypeVar("T")
FIRST_DELAY = 1.0
DOCKER_HUB = "docker.io"

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
_RETRYING = re.compile(r"^Retrying in (\d+) seconds?$")
# The status line that ends a push; Docker 26's containerd image store gives the digest
# only here (the classic store also sends it as an ``aux`` record).
_PUSHED_DIGEST = re.compile(r": digest: (sha256:[0-9a-f]{64}) size: \d+$")
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
class Credentials:
    """Who we are at one registry; no user means ~/.docker/config.json (docker login)."""

    registry: str
    user: str = ""
    password: str = field(default="", repr=False)

    def auth_config(self) -> dict[str, str] | None:
        """What docker-py sends as X-Registry-Auth; None lets it read the client config."""
        if not self.user:
            return None
        return {"username": self.user, "password": self.password, "serveraddress": self.registry}

    def who(self) -> str:
        """``user alice``, or how we authenticate without one; never the password."""
        return f"user {self.user}" if self.user else "no user set: docker login"

    def redact(self, text: str) -> str:
        """``text`` with the password (plain, URL-quoted, in a Basic header) masked."""
        return Masker.of([self.password], logins=[(self.user, self.password)]).mask(text)


def registry_host(repository: str) -> str:
    """The registry a repository lives on: its first component if that is a host."""
    first, _, rest = repository.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first
    return DOCKER_HUB


def path_in_registry(repository: str) -> str:
    """The repository without its registry host: ``ghcr.io/org/app`` -> ``org/app``."""
    host = registry_host(repository)
    return repository.removeprefix(f"{host}/") if host != DOCKER_HUB else repository


def credentials_for(settings: Settings, registry: str) -> Credentials:
    """The configured user and password for ``registry``, or none (docker login).

    They go only to LAYERKEEP_REGISTRY (or to any registry when that is empty), so a
    cache repository on another host never receives them.
    """
    if settings.registry_password and not settings.registry_user:
        raise ConfigError(
            "LAYERKEEP_REGISTRY_PASSWORD is set but LAYERKEEP_REGISTRY_USER is empty",
            key="LAYERKEEP_REGISTRY_USER",
            hint="set the user the password or token belongs to",
        )
    if settings.registry_user and settings.registry in ("", registry):
        return Credentials(registry, settings.registry_user, settings.registry_password)
    return Credentials(registry)


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


@dataclass(frozen=True)
class Pushed:
    """One tag pushed: the manifest digest the registry stored, and what it took."""

    reference: str
    digest: str
    seconds: float
    attempts: int
    layers_pushed: int
    bytes_pushed: int


@dataclass(frozen=True)
class Pulled:
    """One tag pulled: its digest, whether anything new came down, and what it took."""

    reference: str
    digest: str
    downloaded: bool
    seconds: float
    attempts: int
    bytes_downloaded: int


def push_tag(
    engine: Engine,
    reference: ImageRef,
    credentials: Credentials,
    *,
    attempts: int,
    time_limit: float | None = None,
    log: Log,
    sleep: Sleep = time.sleep,
    progress: MeterFactory = silent,
) -> Pushed:
    """Push one local tag; return the digest its stream reports (``aux`` or status line).

    ``time_limit`` bounds the whole push, retries included (see the module's notes);
    ``progress`` shows the bytes sent.
    """
    started = time.monotonic()
    engine_retries = _EngineRetries("push", str(reference), attempts, log)

    def once(deadline: float | None) -> tuple[str, int, int]:
        digest = ""
        totals: dict[str, int] = {}
        pushed: set[str] = set()
        engine_retries.next_attempt()
        sent = TransferProgress(progress(f"push {reference}", None, "B"))
        for chunk in engine.push(
            str(reference), auth=credentials.auth_config(), deadline=deadline
        ):
            sent.note(chunk)
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
            layer, status = str(chunk.get("id", "")), str(chunk.get("status", ""))
            stated = _PUSHED_DIGEST.search(status)
            if stated and not digest:
                digest = stated[1]
            total = (chunk.get("progressDetail") or {}).get("total")
            if layer and isinstance(total, int):
                totals[layer] = max(total, totals.get(layer, 0))
            if layer and status == "Pushed":
                pushed.add(layer)
            engine_retries.note(status)
        sent.close()
        if not digest:
            raise DockerOperationError(
                f"push {reference} ended without a digest", image=str(reference)
            )
        return digest, len(pushed), sum(totals.get(layer, 0) for layer in pushed)

    (digest, layers, size), tries = with_retries(
        once, action="push", reference=str(reference), credentials=credentials,
        attempts=attempts, time_limit=time_limit, log=log, sleep=sleep,
    )
    return Pushed(str(reference), digest, time.monotonic() - started, tries, layers, size)


def pull_tag(
    engine: Engine,
    reference: ImageRef,
    credentials: Credentials,
    *,
    attempts: int,
    time_limit: float | None = None,
    log: Log,
    sleep: Sleep = time.sleep,
    progress: MeterFactory = silent,
) -> Pulled:
    """Pull one tag; a tag the registry lacks raises TagNotFound.

    ``time_limit`` bounds the whole pull, retries included (see the module's notes);
    ``progress`` shows the bytes received.
    """
    started = time.monotonic()
    engine_retries = _EngineRetries("pull", str(reference), attempts, log)

    def once(deadline: float | None) -> tuple[str, bool, int]:
        digest, downloaded = "", False
        totals: dict[str, int] = {}
        engine_retries.next_attempt()
        received = TransferProgress(progress(f"pull {reference}", None, "B"))
        for chunk in engine.pull(
            str(reference), auth=credentials.auth_config(), deadline=deadline
        ):
            received.note(chunk)
            status = str(chunk.get("status", ""))
            engine_retries.note(status)
            if status.startswith("Digest: "):
                digest = status.removeprefix("Digest: ").strip()
            elif status.startswith("Status: Downloaded newer image"):
                downloaded = True
            total = (chunk.get("progressDetail") or {}).get("total")
            if status == "Downloading" and isinstance(total, int):
                layer = str(chunk.get("id", ""))
                totals[layer] = max(total, totals.get(layer, 0))
        received.close()
        return digest, downloaded, sum(totals.values())

    (digest, downloaded, size), tries = with_retries(
        once, action="pull", reference=str(reference), credentials=credentials,
        attempts=attempts, time_limit=time_limit, log=log, sleep=sleep,
    )
    return Pulled(str(reference), digest, downloaded, time.monotonic() - started, tries, size)


class TransferProgress:
    """Bytes moved by a push or pull, from the engine's per-layer progress records."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.layers: dict[str, int] = {}

    def note(self, chunk: Mapping[str, Any]) -> None:
        """Advance the meter by what this record says a layer moved since the last."""
        current = (chunk.get("progressDetail") or {}).get("current")
        layer = str(chunk.get("id", ""))
        if not layer or not isinstance(current, int):
            return
        moved = current - self.layers.get(layer, 0)
        if moved > 0:
            self.layers[layer] = current
            self.meter.advance(moved)

    def close(self) -> None:
        """The transfer ended."""
        self.meter.close()


def remote_digest(
    engine: Engine,
    reference: ImageRef,
    credentials: Credentials,
    *,
    attempts: int,
    time_limit: float | None = None,
    log: Log,
    sleep: Sleep = time.sleep,
) -> str | None:
    """The manifest digest ``reference`` resolves to in its registry; None when absent."""

    def once(deadline: float | None) -> str:
        return engine.registry_digest(
            str(reference), auth=credentials.auth_config(), deadline=deadline
        )

    try:
        digest, _ = with_retries(
            once, action="look up", reference=str(reference), credentials=credentials,
            attempts=attempts, time_limit=time_limit, log=log, sleep=sleep,
        )
    except TagNotFound:
        return None
    return digest


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


class _EngineRetries:
    """Says in one line per attempt that the engine retries a transfer itself.

    The engine retries a failed layer upload or download 5 times (waits of 5, 10, 15
    and 20 s) before it reports the error, and counts each wait down once a second;
    without a word the job looks hung, and with every record it floods the log.
    """

    def __init__(self, action: str, reference: str, attempts: int, log: Log) -> None:
        self._action, self._reference, self._attempts, self._log = (
            action, reference, attempts, log,
        )
        self._attempt = 0
        self._said = False

    def next_attempt(self) -> None:
        """A new attempt of ours begins."""
        self._attempt += 1
        self._said = False

    def note(self, status: str) -> None:
        """Look at one progress record's status."""
        if self._said or not _RETRYING.match(status):
            return
        self._said = True
        self._log(
            f"{self._action} {self._reference}: attempt {self._attempt}/{self._attempts}: the "
            f"registry failed a layer {'upload' if self._action == 'push' else 'download'}; "
            "the engine retries it itself (5 tries, about 50 s)"
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


def local_digests(engine: Engine, reference: str) -> Iterable[str]:
    """The ``repository@digest`` names the engine records for a local image."""
    attrs: Mapping[str, Any] | None = engine.image_attrs(reference)
    return tuple(str(name) for name in (attrs or {}).get("RepoDigests") or ())


def _short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:300]


TAG_MAX = 128
_NOT_IN_TAG = re.compile(r"[^a-z0-9_.-]+")
_DASHES = re.compile(r"-{2,}")
_HASH_LENGTH = 10
# What safe_tag appends to a name it changed; a valid name that already ends so is
# changed too, so that it cannot meet another name's hashed tag.
_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_LENGTH}}}\Z")


def safe_tag(
    name: str,
    *,
    empty_prefix: str = "branch",
    always_hash: bool = False,
    limit: int = TAG_MAX,
    reserved: Collection[str] = ("latest",),
) -> str:
    """A valid Docker tag for any name (a branch, a git tag, an image); two names never share one.

    A name that is already a valid tag of at most ``limit`` characters stays as it is
    (``main``, ``v1.2.0``, ``Feature-A``). Any other name is made valid and readable:
    accents transliterated (``é`` -> ``e``), lowercased, each run of other characters one
    ``-``, no leading or trailing ``.``/``-``, shortened to fit; and since that changed
    it, ``-`` and 10 hex digits of the SHA-256 of the original name are appended:
    ``feature/a`` -> ``feature-a-951d42dc02``, ``Feature/A`` -> ``feature-a-<another>``.
    A name without a usable character becomes ``<empty_prefix>-<hash>``. A valid name
    in ``reserved`` (any case: ``latest``), a valid one that already ends like a hashed
    tag, or any name with ``always_hash``, is hashed too; so distinct names get distinct
    tags (short of a 40-bit hash collision), and the same name always the same tag.
    """
    if (
        not always_hash
        and len(name) <= limit
        and is_valid_tag(name)
        and name.lower() not in {word.lower() for word in reserved}
        and not _HASHED.search(name)
    ):
        return name
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_text = decomposed.encode("ascii", "ignore").decode()
    slug = _DASHES.sub("-", _NOT_IN_TAG.sub("-", ascii_text.lower())).strip(".-")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]
    slug = slug[: limit - _HASH_LENGTH - 1].rstrip(".-")
    return f"{slug or empty_prefix}-{digest}"
