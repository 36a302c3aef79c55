"""Who we are at a registry, and which registry a repository lives on.

Credentials come from the settings (``LAYERKEEP_REGISTRY_USER``/``_PASSWORD``), sent only
to ``LAYERKEEP_REGISTRY``; without a user docker-py sends what ``~/.docker/config.json``
holds for that registry, so an earlier ``docker login`` works.

The password never leaves this module in clear: :meth:`Credentials.redact` masks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from layerkeep.core.errors import ConfigError
from layerkeep.core.secrets import Masker
from layerkeep.core.settings import Settings

DOCKER_HUB = "docker.io"


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
