"""JSON views: create and list notes (PostgreSQL), read one and count reads (Redis)."""

import json

from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_http_methods

from notes.models import Note

MAX_LIST = 50


def _reads_key(note_id: int) -> str:
    return f"notes:reads:{note_id}"


def _as_json(note: Note, reads: int | None = None) -> dict[str, object]:
    shown: dict[str, object] = {
        "id": note.id,
        "title": note.title,
        "body": note.body,
        "created_at": note.created_at.isoformat(),
    }
    if reads is not None:
        shown["reads"] = reads
    return shown


@csrf_exempt
@require_http_methods(["GET", "POST"])
def notes(request: HttpRequest) -> JsonResponse:
    """GET: the newest notes; POST {"title", "body"}: a new note (201)."""
    if request.method == "GET":
        return JsonResponse({"notes": [_as_json(n) for n in Note.objects.all()[:MAX_LIST]]})
    try:
        data = json.loads(request.body)
    except ValueError:
        return JsonResponse({"error": "send a JSON object"}, status=400)
    title = str(data.get("title", "")).strip() if isinstance(data, dict) else ""
    if not title or len(title) > 200:
        return JsonResponse({"error": "title: 1 to 200 characters"}, status=400)
    note = Note.objects.create(title=title, body=str(data.get("body", "")))
    return JsonResponse(_as_json(note), status=201)


@require_http_methods(["GET"])
def note(request: HttpRequest, note_id: int) -> JsonResponse:
    """One note, and one more read counted in Redis."""
    found = get_object_or_404(Note, pk=note_id)
    key = _reads_key(found.id)
    cache.add(key, 0, timeout=None)
    return JsonResponse(_as_json(found, reads=cache.incr(key)))


@require_http_methods(["GET"])
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when PostgreSQL and Redis both answer, else 503 naming the one that does not."""
    failing = []
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:  # any database failure means "not healthy"
        failing.append("postgres")
    try:
        cache.set("notes:healthz", "ok", timeout=10)
    except Exception:  # any cache failure means "not healthy"
        failing.append("redis")
    return JsonResponse({"failing": failing}, status=503 if failing else 200)
