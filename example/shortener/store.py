"""Storage: links live in PostgreSQL, hit counters in Redis."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass
from datetime import datetime

import psycopg
import redis
from psycopg.rows import dict_row

ALPHABET = string.ascii_letters + string.digits
CODE_LENGTH = 7
HITS_PREFIX = "shortener:hits:"


@dataclass(frozen=True)
class Link:
    """A stored short link."""

    code: str
    url: str
    created_at: datetime


def new_code(length: int = CODE_LENGTH) -> str:
    """Return a random base62 code."""
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def hits_key(code: str) -> str:
    """Redis key of the hit counter of ``code``."""
    return HITS_PREFIX + code


class LinkStore:
    """Links in PostgreSQL and their hit counts in Redis.

    A PostgreSQL connection is opened per operation (plenty for a small service);
    the Redis client keeps its own connection pool.
    """

    def __init__(self, database_url: str, redis_client: redis.Redis) -> None:
        """Use the database at ``database_url`` and the given Redis client."""
        self._database_url = database_url
        self._redis = redis_client

    def _connect(self) -> psycopg.Connection[dict[str, object]]:
        return psycopg.connect(self._database_url, row_factory=dict_row, connect_timeout=5)

    def create(self, url: str, attempts: int = 5) -> Link:
        """Store ``url`` under a fresh code, retrying on the rare collision."""
        with self._connect() as conn:
            for _ in range(attempts):
                row = conn.execute(
                    "INSERT INTO links (code, url) VALUES (%s, %s) "
                    "ON CONFLICT (code) DO NOTHING RETURNING code, url, created_at",
                    (new_code(), url),
                ).fetchone()
                if row is not None:
                    return _link(row)
        raise RuntimeError(f"no free code after {attempts} attempts")

    def get(self, code: str) -> Link | None:
        """Return the link stored under ``code``, if any."""
        with self._connect() as conn:
            row = conn.execute(
                "SELECT code, url, created_at FROM links WHERE code = %s", (code,)
            ).fetchone()
        return None if row is None else _link(row)

    def record_hit(self, code: str) -> int:
        """Count one visit of ``code``; return the new count."""
        return int(self._redis.incr(hits_key(code)))

    def hits(self, code: str) -> int:
        """Return how often ``code`` was visited."""
        value = self._redis.get(hits_key(code))
        return int(value) if value is not None else 0

    def check(self) -> dict[str, str]:
        """Probe both backends; map each name to "ok" or the error text."""
        status: dict[str, str] = {}
        try:
            with self._connect() as conn:
                conn.execute("SELECT 1").fetchone()
            status["postgres"] = "ok"
        except psycopg.Error as exc:
            status["postgres"] = f"error: {exc}".strip()
        try:
            self._redis.ping()
            status["redis"] = "ok"
        except redis.RedisError as exc:
            status["redis"] = f"error: {exc}"
        return status


def _link(row: dict[str, object]) -> Link:
    created_at = row["created_at"]
    assert isinstance(created_at, datetime)
    return Link(code=str(row["code"]), url=str(row["url"]), created_at=created_at)
