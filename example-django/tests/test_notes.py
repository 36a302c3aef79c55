import json

import pytest
from django.conf import settings
from django.db import connection
from django.test import Client
from notes.models import Note

pytestmark = pytest.mark.django_db


def post(client: Client, payload: object) -> tuple[int, dict[str, object]]:
    response = client.post("/notes", data=json.dumps(payload), content_type="application/json")
    return response.status_code, response.json()


def test_create_and_read(client: Client) -> None:
    status, made = post(client, {"title": "groceries", "body": "eggs"})
    assert status == 201
    shown = client.get(f"/notes/{made['id']}").json()
    assert shown["title"] == "groceries"
    assert shown["body"] == "eggs"


def test_reads_are_counted_in_redis(client: Client) -> None:
    _, made = post(client, {"title": "counted"})
    counts = [client.get(f"/notes/{made['id']}").json()["reads"] for _ in range(3)]
    assert counts == [1, 2, 3]


def test_list_is_newest_first(client: Client) -> None:
    for title in ("first", "second", "third"):
        post(client, {"title": title})
    titles = [n["title"] for n in client.get("/notes").json()["notes"]]
    assert titles == ["third", "second", "first"]


@pytest.mark.parametrize("payload", [{}, {"title": ""}, {"title": "x" * 201}, ["title"]])
def test_bad_notes_are_refused(client: Client, payload: object) -> None:
    status, answer = post(client, payload)
    assert status == 400
    assert "error" in answer
    assert Note.objects.count() == 0


def test_unknown_note_is_404(client: Client) -> None:
    assert client.get("/notes/999999").status_code == 404


def test_health_sees_both_services(client: Client) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200, response.json()


def test_runs_on_postgres() -> None:
    assert connection.vendor == "postgresql"
    assert settings.CACHES["default"]["BACKEND"].endswith("RedisCache")


@pytest.mark.skipif(not settings.DEBUG, reason="needs DJANGO_DEBUG=1 (development only)")
def test_debug_404_page_is_technical(client: Client) -> None:
    assert b"Using the URLconf" in client.get("/nowhere").content
