"""Service settings: which containers a job needs, and the keys that describe each one.

Services are named in ``LAYERKEEP_SERVICES``; each name ``n`` may be described by
``LAYERKEEP_<N>_<SUFFIX>`` keys (``-`` in a name becomes ``_``). ``postgres`` and
``redis`` are known kinds with defaults; any other service is ``generic``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from layerkeep.core.imageref import parse_image_ref
from layerkeep.core.values import Invalid, parse_list, parse_number, parse_pairs, parse_port

PREFIX = "LAYERKEEP_"
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
T = TypeVar("T")


@dataclass(frozen=True)
class Kind:
    """Defaults for a known kind of service."""

    image: str
    port: int | None
    ready: str


KINDS: dict[str, Kind] = {
    # During initdb the official image listens on its socket only: ask over TCP.
    "postgres": Kind("postgres:15", 5432, "pg_isready -h 127.0.0.1 -p 5432"),
    "redis": Kind("redis:7", 6379, "redis-cli ping"),
    "generic": Kind("", None, ""),
}
# Services named like a known kind may be described even when not in LAYERKEEP_SERVICES,
# so one .env can prepare them for a job that turns them on.
KNOWN_KINDS = ("postgres", "redis")


@dataclass(frozen=True)
class ServiceKey:
    """A per-service key suffix, its default text and meaning (documented in .env.example)."""

    suffix: str
    doc: str


SERVICE_KEYS: tuple[ServiceKey, ...] = (
    ServiceKey("IMAGE", "image; default postgres:15 or redis:7 for those kinds"),
    ServiceKey("KIND", "postgres, redis or generic; default: the name if it is a kind"),
    ServiceKey("ENV", "container environment, comma-separated NAME=value"),
    ServiceKey("COMMAND", "command overriding the image's, e.g. redis-server --appendonly no"),
    ServiceKey("READY", "readiness command run inside the container (exit 0 = ready)"),
    ServiceKey("CONTAINER_PORT", "the port the service listens on inside the job's network"),
    ServiceKey("PORT", "host port on 127.0.0.1 to publish it on, for local debugging"),
    ServiceKey("TIMEOUT", "seconds to wait until ready (default 60)"),
)
SUFFIXES = tuple(key.suffix for key in SERVICE_KEYS)


@dataclass(frozen=True)
class ServiceSpec:
    """One service container a job runs."""

    name: str
    kind: str
    image: str
    env: Mapping[str, str] = field(repr=False)  # may hold passwords
    command: str
    ready: str
    container_port: int | None
    host_port: int | None
    timeout: float


def env_name(service: str) -> str:
    """The key infix of a service name: ``my-cache`` -> ``MY_CACHE``."""
    return service.upper().replace("-", "_")


def service_key(service: str, suffix: str) -> str:
    """``LAYERKEEP_<NAME>_<SUFFIX>``."""
    return f"{PREFIX}{env_name(service)}_{suffix}"


def parse_names(value: str) -> tuple[str, ...]:
    """Service names from ``LAYERKEEP_SERVICES``."""
    names = parse_list(value)
    for name in names:
        if not _NAME.match(name):
            raise Invalid(f"{name!r}: use lowercase letters, digits and '-', after a letter")
    if len(set(names)) != len(names):
        raise Invalid("a service is named twice")
    return names


def parse_service(
    name: str, get: Callable[[str], str], *, postgres_env: Mapping[str, str]
) -> ServiceSpec:
    """One service from its keys; ``get(suffix)`` returns the text ('' when unset).

    A bad value raises Invalid whose ``suffix`` names the key at fault.
    """

    def checked(suffix: str, parse: Callable[[str], T]) -> T:
        try:
            return parse(get(suffix))
        except Invalid as error:
            raise Invalid(str(error), suffix=suffix) from None

    kind = get("KIND").strip() or (name if name in KINDS else "generic")
    if kind not in KINDS:
        raise Invalid(f"allowed: {', '.join(KINDS)}", suffix="KIND")
    defaults = KINDS[kind]
    image = get("IMAGE").strip() or defaults.image
    if not image:
        raise Invalid(f"a {kind} service needs an image", suffix="IMAGE")
    if parse_image_ref(image) is None:
        raise Invalid("use a Docker reference like postgres:15", suffix="IMAGE")
    own_env = checked("ENV", parse_pairs)
    container_port = checked("CONTAINER_PORT", parse_port) or defaults.port
    host_port = checked("PORT", parse_port)
    if host_port and container_port is None:
        raise Invalid(f"also set {service_key(name, 'CONTAINER_PORT')}", suffix="PORT")
    timeout = checked("TIMEOUT", lambda text: parse_number(text or "60", 1, 3600))
    return ServiceSpec(
        name=name,
        kind=kind,
        image=image,
        env={**(postgres_env if kind == "postgres" else {}), **own_env},
        command=get("COMMAND").strip(),
        ready=get("READY").strip() or defaults.ready,
        container_port=container_port,
        host_port=host_port,
        timeout=timeout,
    )
