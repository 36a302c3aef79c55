"""Operations: the migration entry point and the health check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from flask.testing import FlaskClient

import shortener
from shortener.app import create_app
from shortener.config import Settings
from shortener.migrate import SCHEMA_PATH, apply_schema

PROJECT_DIR = Path(shortener.__file__).resolve().parent.parent


def run_migrate() -> subprocess.CompletedProcess[str]:
    """Run ``python -m shortener.migrate`` the way an operator (or layerkeep) would."""
    return subprocess.run(
        [sys.executable, "-m", "shortener.migrate"],
        cwd=PROJECT_DIR,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_schema_file_is_shipped() -> None:
    assert SCHEMA_PATH.is_file()
    assert "CREATE TABLE IF NOT EXISTS links" in SCHEMA_PATH.read_text()


def test_migration_is_idempotent_and_keeps_data(
    client: FlaskClient, db: psycopg.Connection, settings: Settings
) -> None:
    code = client.post("/links", json={"url": "https://example.org/"}).get_json()["code"]

    for _ in range(2):
        result = run_migrate()
        assert result.returncode == 0, result.stderr
        assert "applied" in result.stdout
    apply_schema(settings.database_url)

    assert db.execute("SELECT code FROM links").fetchall() == [(code,)]


def test_migration_creates_schema_from_scratch(db: psycopg.Connection, settings: Settings) -> None:
    db.execute("DROP TABLE links")
    try:
        result = run_migrate()
        assert result.returncode == 0, result.stderr
        assert db.execute("SELECT to_regclass('links') IS NOT NULL").fetchone() == (True,)
    finally:
        apply_schema(settings.database_url)


def test_migration_without_database_url_fails_cleanly() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "shortener.migrate"],
        cwd=PROJECT_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 1
    assert "DATABASE_URL" in result.stderr


def test_healthz_ok(client: FlaskClient) -> None:
    response = client.get("/healthz")

    assert response.status_code == 200
    assert response.get_json() == {"status": "ok", "postgres": "ok", "redis": "ok"}


def test_healthz_reports_a_dead_backend(settings: Settings) -> None:
    # Port 1 on localhost refuses connections: Redis is down, PostgreSQL is fine.
    broken = Settings(settings.database_url, "redis://127.0.0.1:1/0")
    client = create_app(broken).test_client()

    response = client.get("/healthz")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "unavailable"
    assert body["postgres"] == "ok"
    assert body["redis"].startswith("error")
