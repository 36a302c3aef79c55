"""Settings read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


class ConfigError(RuntimeError):
    """A required setting is missing or malformed."""


@dataclass(frozen=True)
class Settings:
    """Where the two backends live.

    ``database_url`` is a libpq URI (``postgresql://user:pass@host:port/db``),
    ``redis_url`` a Redis URL (``redis://host:port/0``).
    """

    database_url: str
    redis_url: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``DATABASE_URL`` and ``REDIS_URL``; both are required."""
        env = os.environ if environ is None else environ
        database_url = env.get("DATABASE_URL", "").strip()
        redis_url = env.get("REDIS_URL", "").strip()
        missing = [
            name
            for name, value in (("DATABASE_URL", database_url), ("REDIS_URL", redis_url))
            if not value
        ]
        if missing:
            raise ConfigError(f"missing environment variable(s): {', '.join(missing)}")
        if not database_url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("DATABASE_URL must start with postgresql://")
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("REDIS_URL must start with redis://")
        return cls(database_url=database_url, redis_url=redis_url)
