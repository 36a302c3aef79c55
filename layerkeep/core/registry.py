"""Registry primitives: credentials, push and pull of one tag with retries, digests.

Credentials come from the settings (``LAYERKEEP_REGISTRY_USER``/``_PASSWORD``), sent only
to ``LAYERKEEP_REGISTRY``; without a user docker-py sends what ``~/.docker/config.json``
holds for that registry, so an earlier ``docker login`` works.

Failures are sorted by the engine's text, because push and pull report them in-band and
the engine answers 500 for most registry problems whatever the registry said:

- authentication ("unauthorized", "authentication required", "denied", "no basic auth
  credentials"): raised at once as :class:`RegistryAuthError`, never retried;
- transient (connection refused or reset, timeouts, EOF, a registry 5xx): retried with
  exponential backoff (1 s, 2 s, 4 s, ...) up to ``attempts`` tries in all, then raised
  as :class:`RegistryUnavailable`. A registry that is up but fails layer uploads is
  retried by the engine itself first (5 tries per layer, about 50 s, shown as it goes),
  so each of our push attempts can take that long; refused connections fail at once;
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError, DockerOperationError
from layerkeep.core.imageref import ImageRef
from layerkeep.core.job import Masker
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
    r"connection refused|connection reset|broken pipe|timeout|timed out|\bEOF\b"
    r"|unexpected HTTP status: 5\d\d|service unavailable|bad gateway|too many requests",
    re.IGNORECASE,
)
_RETRYING = re.compile(r"^Retrying in (\d+) seconds?$")
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
    log: Log,
    sleep: Sleep = time.sleep,
) -> Pushed:
    """Push one local tag; return the digest from the stream's ``aux`` record."""
    started = time.monotonic()

    def once() -> tuple[str, int, int]:
        digest = ""
        totals: dict[str, int] = {}
        pushed: set[str] = set()
        waits: dict[str, int] = {}
        for chunk in engine.push(str(reference), auth=credentials.auth_config()):
            aux = chunk.get("aux")
            if isinstance(aux, dict) and aux.get("Digest"):
                digest = str(aux["Digest"])
            layer, status = str(chunk.get("id", "")), str(chunk.get("status", ""))
            total = (chunk.get("progressDetail") or {}).get("total")
            if layer and isinstance(total, int):
                totals[layer] = max(total, totals.get(layer, 0))
            if layer and status == "Pushed":
                pushed.add(layer)
            countdown = _RETRYING.match(status)
            if countdown:
                # The engine retries a failed layer upload 5 times (5 s, 10 s, ... 20 s)
                # before it reports the error, counting down each second: say when a
                # wait starts, or the job looks hung.
                seconds = int(countdown[1])
                if seconds > waits.get(layer, 0):
                    log(f"push {reference}: the engine retries layer {layer} in {seconds} s")
                waits[layer] = seconds
        if not digest:
            raise DockerOperationError(
                f"push {reference} ended without a digest", image=str(reference)
            )
        return digest, len(pushed), sum(totals.get(layer, 0) for layer in pushed)

    (digest, layers, size), tries = with_retries(
        once, action="push", reference=str(reference), credentials=credentials,
        attempts=attempts, log=log, sleep=sleep,
    )
    return Pushed(str(reference), digest, time.monotonic() - started, tries, layers, size)


def pull_tag(
    engine: Engine,
    reference: ImageRef,
    credentials: Credentials,
    *,
    attempts: int,
    log: Log,
    sleep: Sleep = time.sleep,
) -> Pulled:
    """Pull one tag; a tag the registry lacks raises TagNotFound."""
    started = time.monotonic()

    def once() -> tuple[str, bool, int]:
        digest, downloaded = "", False
        totals: dict[str, int] = {}
        for chunk in engine.pull(str(reference), auth=credentials.auth_config()):
            status = str(chunk.get("status", ""))
            if status.startswith("Digest: "):
                digest = status.removeprefix("Digest: ").strip()
            elif status.startswith("Status: Downloaded newer image"):
                downloaded = True
            total = (chunk.get("progressDetail") or {}).get("total")
            if status == "Downloading" and isinstance(total, int):
                layer = str(chunk.get("id", ""))
                totals[layer] = max(total, totals.get(layer, 0))
        return digest, downloaded, sum(totals.values())

    (digest, downloaded, size), tries = with_retries(
        once, action="pull", reference=str(reference), credentials=credentials,
        attempts=attempts, log=log, sleep=sleep,
    )
    return Pulled(str(reference), digest, downloaded, time.monotonic() - started, tries, size)


def remote_digest(
    engine: Engine,
    reference: ImageRef,
    credentials: Credentials,
    *,
    attempts: int,
    log: Log,
    sleep: Sleep = time.sleep,
) -> str | None:
    """The manifest digest ``reference`` resolves to in its registry; None when absent."""

    def once() -> str:
        return engine.registry_digest(str(reference), auth=credentials.auth_config())

    try:
        digest, _ = with_retries(
            once, action="look up", reference=str(reference), credentials=credentials,
            attempts=attempts, log=log, sleep=sleep,
        )
    except TagNotFound:
        return None
    return digest


def with_retries(
    call: Callable[[], T],
    *,
    action: str,
    reference: str,
    credentials: Credentials,
    attempts: int,
    log: Log,
    sleep: Sleep = time.sleep,
) -> tuple[T, int]:
    """Run ``call`` until it succeeds, retrying transient failures with backoff.

    Returns the result and the number of attempts it took.
    """
    delay = FIRST_DELAY
    for attempt in range(1, attempts + 1):
        try:
            return call(), attempt
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
        if attempt == attempts:
            raise RegistryUnavailable(
                f"{action} {reference} failed after {attempts} attempt(s): {text}",
                image=reference,
                attempts=attempts,
                hint=f"is {credentials.registry} up and reachable from the Docker engine? "
                "LAYERKEEP_PUSH_RETRIES sets the attempts",
            ) from None
        log(
            f"{action} {reference}: attempt {attempt}/{attempts} failed ({text}); "
            f"retrying in {delay:g} s"
        )
        sleep(delay)
        delay *= 2
    raise AssertionError("unreachable: attempts is at least 1")  # pragma: no cover


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


def safe_tag(
    name: str, *, empty_prefix: str = "branch", always_hash: bool = False, limit: int = TAG_MAX
) -> str:
    """A valid, readable Docker tag for any name (a branch, a git tag, an image).

    Lowercased (tags may hold uppercase, but lowercase reads better and matches the
    usual CI slugs); every run of other characters becomes one ``-``; accents are
    transliterated (``é`` -> ``e``); leading and trailing ``.``/``-`` go. A short hash
    of the full name is appended when letters had to be dropped (``日本``) or the tag
    had to be shortened to ``limit`` characters (or always, with ``always_hash``), so
    such names never share a tag; an empty result becomes ``<empty_prefix>-<hash>``.
    """
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_text = decomposed.encode("ascii", "ignore").decode()
    dropped = any(ord(c) > 127 and not unicodedata.combining(c) for c in decomposed)
    slug = _DASHES.sub("-", _NOT_IN_TAG.sub("-", ascii_text.lower())).strip(".-")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]
    if not slug:
        return f"{empty_prefix}-{digest}"
    if always_hash or dropped or len(slug) > limit:
        slug = slug[: limit - _HASH_LENGTH - 1].rstrip(".-") + "-" + digest
    return slug
