"""Fixtures for tests against the real PostgreSQL and Redis named by the environment.

``DATABASE_URL`` and ``REDIS_URL`` must point at throwaway services: the schema is
applied once per session, and the ``links`` table and the hit counters are emptied
before every test.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import redis
from flask import Flask
from flask.testing import FlaskClient

from shortener.app import create_app
from shortener.config import ConfigError, Settings
from shortener.migrate import apply_schema
from shortener.store import HITS_PREFIX


@pytest.fixture(scope="session")
def settings() -> Settings:
    """Backends from ``DATABASE_URL`` and ``REDIS_URL``; fail loudly without them."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        pytest.fail(f"these tests need real backends: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def schema(settings: Settings) -> None:
    """Apply the schema once for the whole session."""
    apply_schema(settings.database_url)


@pytest.fixture(scope="session")
def redis_client(settings: Settings) -> Iterator[redis.Redis]:
    """A Redis client on the test database."""
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def db(settings: Settings, schema: None) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test database."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture(autouse=True)
def clean(db: psycopg.Connection, redis_client: redis.Redis) -> None:
    """Start every test with no links and no hit counters."""
    db.execute("TRUNCATE links")
    keys = list(redis_client.scan_iter(match=HITS_PREFIX + "*"))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def app(settings: Settings) -> Flask:
    """The app under test, configured like production."""
    app = create_app(settings)
    app.config.update(TESTING=True)
    return app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    """A test client of the app."""
    return app.test_client()
