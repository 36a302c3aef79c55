"""The Flask application: create, follow and inspect short links."""

from __future__ import annotations

from urllib.parse import urlsplit

import redis
from flask import Flask, Response, abort, current_app, jsonify, redirect, request
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from shortener.config import Settings
from shortener.store import LinkStore

MAX_URL_LENGTH = 2048


def valid_url(value: object) -> bool:
    """True for an absolute http(s) URL with a host and no whitespace."""
    if not isinstance(value, str) or not value or len(value) > MAX_URL_LENGTH:
        return False
    if any(ch.isspace() for ch in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname)


def _store() -> LinkStore:
    store = current_app.extensions["shortener.store"]
    assert isinstance(store, LinkStore)
    return store


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; settings default to the environment (see :class:`Settings`)."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    redis_client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=5, socket_connect_timeout=5
    )
    app.extensions["shortener.store"] = LinkStore(settings.database_url, redis_client)

    @app.errorhandler(HTTPException)
    def json_error(exc: HTTPException) -> tuple[Response, int]:
        return jsonify(error=exc.description), exc.code or 500

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        checks = _store().check()
        healthy = all(value == "ok" for value in checks.values())
        body = {"status": "ok" if healthy else "unavailable", **checks}
        return jsonify(body), 200 if healthy else 503

    @app.post("/links")
    def create_link() -> tuple[Response, int]:
        payload = request.get_json(silent=True)
        url = payload.get("url") if isinstance(payload, dict) else None
        if not valid_url(url):
            abort(400, description='body must be JSON {"url": "http(s)://..."}')
        assert isinstance(url, str)
        link = _store().create(url)
        body = {"code": link.code, "short_url": request.host_url + link.code}
        return jsonify(body), 201

    @app.get("/links/<code>")
    def show_link(code: str) -> Response:
        store = _store()
        link = store.get(code)
        if link is None:
            abort(404, description=f"no link {code!r}")
        return jsonify(
            code=link.code,
            url=link.url,
            created_at=link.created_at.isoformat(),
            hits=store.hits(code),
        )

    @app.get("/<code>")
    def follow(code: str) -> BaseResponse:
        store = _store()
        link = store.get(code)
        if link is None:
            abort(404, description=f"no link {code!r}")
        store.record_hit(code)
        return redirect(link.url, code=302)

    return app
