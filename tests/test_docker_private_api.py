"""What layerkeep takes from docker-py's private side still holds, without an engine.

The engine package calls a few private methods of docker-py's ``APIClient`` (its
docstring says which and why). A docker-py release may drop or change them with no
notice: these tests run layerkeep's calls through a spy that binds each private call to
the signature of the installed docker-py, against a fake engine (an HTTP server on
127.0.0.1) that checks the request they make. The deadline test needs the fake too: an
engine that never answers cannot be caused on a real one.
"""

from __future__ import annotations

import ast
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import docker
import pytest

from layerkeep.core.engine import Engine, TimeLimitReached

ENGINE_PACKAGE = Path(__file__).resolve().parent.parent / "layerkeep" / "core" / "engine"
API_VERSION = "1.41"
SAVED = b"a tar of two images" * 1000
# How long the fake engine keeps a pull waiting; a pull without a time limit waits it out.
NEVER = 10.0


def private_calls_in_source() -> set[str]:
    """Private attributes the engine package reaches for on a docker-py client."""
    found = set()
    for path in ENGINE_PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and ast.unparse(node.value).endswith("api")
            ):
                found.add(node.attr)
    return found


class FakeEngine(BaseHTTPRequestHandler):
    """Answers ``docker save`` of several images, and keeps a pull waiting."""

    requests: list[str]
    hung_up: threading.Event

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if urlsplit(self.path).path != f"/v{API_VERSION}/images/get":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(SAVED)))
        self.end_headers()
        self.wfile.write(SAVED)

    def do_POST(self) -> None:
        self.requests.append(self.path)
        # Like an engine waiting for a registry that never answers: no headers yet.
        self.connection.settimeout(NEVER)
        try:
            gone = self.rfile.read(1) == b""
        except TimeoutError:
            gone = False
        if gone:
            self.hung_up.set()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status": "pulled"}\r\n')

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def fake_engine() -> Iterator[tuple[Engine, type[FakeEngine]]]:
    handler = type("Handler", (FakeEngine,), {"requests": [], "hung_up": threading.Event()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = docker.DockerClient(
        base_url=f"tcp://127.0.0.1:{server.server_port}", version=API_VERSION, timeout=10
    )
    try:
        yield Engine(client=client, where="a fake engine", labels={}), handler
    finally:
        client.close()
        server.shutdown()
        server.server_close()


class PrivateCallSpy:
    """docker-py's client, each private call bound to the installed method's signature."""

    def __init__(self, api: docker.APIClient) -> None:
        self.api = api
        self.called: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.api, name)
        if not name.startswith("_"):
            return found
        method: Callable[..., Any] = getattr(docker.APIClient, name)

        def bound(*args: Any, **kwargs: Any) -> Any:
            inspect.signature(method).bind(self.api, *args, **kwargs)  # TypeError if changed
            self.called.add(name)
            return found(*args, **kwargs)

        return bound


def test_the_scan_sees_a_private_call() -> None:
    tree = ast.parse("self.api._get(self.api._url('/x'))\nlimit.api.get()\nself._api.ok()\n")
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert {"_get", "_url", "get", "_api"} <= attrs
    assert private_calls_in_source() >= {"_get"}


def test_every_private_call_is_docker_pys_with_the_arguments_layerkeep_passes(
    fake_engine: tuple[Engine, type[FakeEngine]],
) -> None:
    engine, handler = fake_engine
    spy = PrivateCallSpy(engine.client.api)
    engine.client.api = spy

    saved = b"".join(engine.save_images(["app:1", "registry.local:5000/app:2"]))

    assert saved == SAVED
    url = urlsplit(handler.requests[-1])
    assert url.path == f"/v{API_VERSION}/images/get"
    assert parse_qs(url.query) == {"names": ["app:1", "registry.local:5000/app:2"]}
    # Every private name the package uses went through the spy: a new one needs a test here.
    assert spy.called == private_calls_in_source()


def test_a_pull_the_engine_never_answers_stops_at_its_deadline(
    fake_engine: tuple[Engine, type[FakeEngine]],
) -> None:
    engine, handler = fake_engine
    with pytest.raises(TimeLimitReached, match="pull app:1 failed: stopped at the time limit"):
        list(engine.pull("app:1", deadline=time.monotonic() + 0.5))
    # The engine sees the client hang up, which is what cancels a pull.
    assert handler.hung_up.wait(NEVER)
