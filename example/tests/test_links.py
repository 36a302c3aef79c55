"""Creating, following and inspecting links against real PostgreSQL and Redis."""

from __future__ import annotations

from datetime import datetime

import psycopg
import pytest
import redis
from flask.testing import FlaskClient

from shortener.store import hits_key


def shorten(client: FlaskClient, url: str) -> str:
    """Create a link through the API and return its code."""
    response = client.post("/links", json={"url": url})
    assert response.status_code == 201, response.get_data(as_text=True)
    code = response.get_json()["code"]
    assert isinstance(code, str)
    return code


def test_create_link_stores_row_in_postgres(client: FlaskClient, db: psycopg.Connection) -> None:
    response = client.post("/links", json={"url": "https://example.org/a?b=c"})

    assert response.status_code == 201
    body = response.get_json()
    assert body["short_url"] == "http://localhost/" + body["code"]
    row = db.execute("SELECT url FROM links WHERE code = %s", (body["code"],)).fetchone()
    assert row == ("https://example.org/a?b=c",)


def test_codes_are_unique(client: FlaskClient, db: psycopg.Connection) -> None:
    codes = {shorten(client, "https://example.org/") for _ in range(20)}

    assert len(codes) == 20
    assert db.execute("SELECT count(*) FROM links").fetchone() == (20,)


def test_redirect_counts_hits_in_redis(client: FlaskClient, redis_client: redis.Redis) -> None:
    code = shorten(client, "http://example.com/target")

    for expected in (1, 2, 3):
        response = client.get(f"/{code}")
        assert response.status_code == 302
        assert response.headers["Location"] == "http://example.com/target"
        assert redis_client.get(hits_key(code)) == str(expected)


def test_link_details(client: FlaskClient) -> None:
    code = shorten(client, "https://example.net/page")
    client.get(f"/{code}")
    client.get(f"/{code}")

    response = client.get(f"/links/{code}")

    assert response.status_code == 200
    body = response.get_json()
    assert body["code"] == code
    assert body["url"] == "https://example.net/page"
    assert body["hits"] == 2
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None


def test_new_link_has_no_hits(client: FlaskClient) -> None:
    code = shorten(client, "https://example.net/")

    assert client.get(f"/links/{code}").get_json()["hits"] == 0


@pytest.mark.parametrize("path", ["/nOsUcH1", "/links/nOsUcH1"])
def test_unknown_code_is_404(client: FlaskClient, redis_client: redis.Redis, path: str) -> None:
    response = client.get(path)

    assert response.status_code == 404
    assert "error" in response.get_json()
    assert redis_client.exists(hits_key("nOsUcH1")) == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"url": "ftp://example.org/file"},
        {"url": "javascript:alert(1)"},
        {"url": "example.org/no-scheme"},
        {"url": "http://"},
        {"url": "https://exa mple.org/"},
        {"url": "https://example.org/" + "x" * 2100},
        {"url": 42},
        {"link": "https://example.org/"},
        ["https://example.org/"],
    ],
)
def test_invalid_url_is_400(client: FlaskClient, db: psycopg.Connection, payload: object) -> None:
    response = client.post("/links", json=payload)

    assert response.status_code == 400
    assert "error" in response.get_json()
    assert db.execute("SELECT count(*) FROM links").fetchone() == (0,)


def test_non_json_body_is_400(client: FlaskClient) -> None:
    response = client.post("/links", data="url=https://example.org/")

    assert response.status_code == 400
