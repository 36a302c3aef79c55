"""Registries that misbehave, for real, on 127.0.0.1: retries are bounded and classified.

Tiny servers in this file stand for a registry that accepts connections and never
answers, and for one that answers 500 to every request; Debian's docker-registry
(``registry_setup``) is the healthy one. The engine treats 127.0.0.0/8 registries as
insecure: it tries HTTPS first, then plain HTTP.
"""

from __future__ import annotations

import contextlib
import io
import re
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
from registry_setup import running_registry

from layerkeep.cache.buildkit_build import zstd_refused_hint
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError, DockerOperationError
from layerkeep.core.imageref import ImageRef
from layerkeep.core.registry import pull_tag, push_tag, remote_digest
from layerkeep.core.registry_credentials import Credentials
from layerkeep.core.registry_failures import RegistryUnavailable, Retries
from layerkeep.core.settings import load_settings

docker = pytest.mark.docker
ERROR_500 = "received unexpected HTTP status: 500 Internal Server Error"
TLS_HANDSHAKE = b"\x16"
# How long past its time limit a cut push or pull may take to return on a busy 2-core
# machine. Left uncut, each one here would go on for 15 s or more past its limit.
CUT_SLACK = 5.0


def seconds_said(message: str) -> int:
    """The whole seconds a failure message says the operation took ("... in 7 s")."""
    found = re.search(r" in (\d+) s\b", message)
    assert found is not None, message
    return int(found[1])


class RecordedSleep:
    """Sleeps for real, and keeps every delay asked for: the backoffs taken."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)
        time.sleep(seconds)


class FakeRegistry:
    """A server on 127.0.0.1 that never answers, or answers 500 to every request.

    It turns TLS away at once, as a plain-HTTP registry does, so the engine goes on to
    plain HTTP without waiting out its handshake timeout; a silent one stays silent.
    """

    def __init__(self, *, answer_500: bool) -> None:
        self.answer_500 = answer_500
        self.requests: list[tuple[float, str]] = []
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self._server.settimeout(0.2)
        self._open: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self.address = f"127.0.0.1:{self._server.getsockname()[1]}"

    def __enter__(self) -> FakeRegistry:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._server.close()
        for connection in self._open:
            connection.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._server.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._open.append(connection)
            if self.answer_500:
                threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            if connection.recv(1, socket.MSG_PEEK) == TLS_HANDSHAKE:
                connection.close()
                return
            reader = connection.makefile("rb")
            while request := reader.readline():
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                reader.read(length)
                self.requests.append((time.monotonic(), request.decode().strip()))
                connection.sendall(
                    b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
                )


@contextlib.contextmanager
def pushable(engine: Engine, registry: str, repository: str) -> Iterator[ImageRef]:
    """A one-file image tagged for ``registry``; the tag is removed afterwards."""
    content = uuid.uuid4().hex.encode()
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    image = engine.import_image(iter([data.getvalue()]), reference=repository, changes=[])
    reference = ImageRef(f"{registry}/{repository}/app", "1")
    engine.tag_image(image, str(reference))
    try:
        yield reference
    finally:
        engine.remove_image(str(reference), force=True)


def quiet(_: str) -> None:
    pass


# --- a registry that never answers ---------------------------------------------------


@docker
def test_push_to_a_silent_registry_is_retried_until_the_time_limit(
    engine: Engine, unique_repository: str
) -> None:
    lines: list[str] = []
    with (
        FakeRegistry(answer_500=False) as registry,
        pushable(engine, registry.address, unique_repository) as reference,
    ):
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as raised:
            push_tag(engine, reference, Credentials(registry.address),
                     Retries(5, lines.append, time_limit=30))
        took = time.monotonic() - started
    # The engine gives a silent registry 25 s (10 s for HTTPS, 15 s for HTTP) and calls
    # it a timeout: retried; the second attempt is stopped at the limit (uncut, at 51 s).
    assert 30 <= took < 30 + CUT_SLACK, took
    assert raised.value.attempts == 2
    assert re.fullmatch(
        rf"push {re.escape(str(reference))} failed after 2 attempts in \d+ s: stopped at the "
        r"30 s time limit; attempt 1 failed with: .*(Timeout|deadline exceeded).*",
        raised.value.message,
    ), raised.value.message
    assert 30 <= seconds_said(raised.value.message) <= round(took)
    assert "LAYERKEEP_PUSH_TIMEOUT" in raised.value.hint
    assert len(lines) == 1
    assert re.fullmatch(
        rf"push {re.escape(str(reference))}: attempt 1/5 failed after 2\d s \(.*\); "
        r"retrying in 1 s",
        lines[0],
    ), lines


@docker
def test_pull_and_lookup_at_a_silent_registry_stop_at_the_time_limit(engine: Engine) -> None:
    with FakeRegistry(answer_500=False) as registry:
        reference = ImageRef(f"{registry.address}/layerkeep-test/never", "1")
        credentials = Credentials(registry.address)

        def pull() -> object:
            return pull_tag(engine, reference, credentials, Retries(3, quiet, time_limit=3))

        def look_up() -> object:
            return remote_digest(engine, reference, credentials, Retries(3, quiet, time_limit=3))

        for action, call in [("pull", pull), ("look up", look_up)]:
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable) as raised:
                call()
            took = time.monotonic() - started
            # Uncut, the engine would wait 25 s for a silent registry.
            assert 3 <= took < 3 + CUT_SLACK, (action, took)
            message = raised.value.message
            assert message == (
                f"{action} {reference} failed after 1 attempt in {seconds_said(message)} s: "
                "stopped at the 3 s time limit"
            )
            assert 3 <= seconds_said(message) <= round(took)
        assert registry.connections >= 2  # the engine did try, once for each


# --- a registry that answers 500 -----------------------------------------------------


@docker
def test_push_to_a_registry_answering_500_is_cut_at_the_limit_in_one_line(
    engine: Engine, unique_repository: str
) -> None:
    lines: list[str] = []
    with (
        FakeRegistry(answer_500=True) as registry,
        pushable(engine, registry.address, unique_repository) as reference,
    ):
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as raised:
            push_tag(engine, reference, Credentials(registry.address),
                     Retries(3, lines.append, time_limit=7))
        failed = time.monotonic()
        # Left alone, the engine would try the upload again 15 s after it began: wait
        # past that to see it never comes (an absence: nothing to poll for).
        time.sleep(max(0.0, started + 17 - failed))
        uploads = [at for at, request in registry.requests if "/blobs/uploads/" in request]
    # Uncut, the engine would go on retrying the upload for about 50 s.
    assert 7 <= failed - started < 7 + CUT_SLACK
    message = raised.value.message
    assert message == (
        f"push {reference} failed after 1 attempt in {seconds_said(message)} s: "
        "stopped at the 7 s time limit"
    )
    assert 7 <= seconds_said(message) <= round(failed - started)
    # The engine counted down every second from 5 s and from 10 s; one line says so.
    assert lines == [
        f"push {reference}: attempt 1/3: the registry failed a layer upload; the engine "
        "retries it itself (5 tries, about 50 s)"
    ]
    assert len(uploads) == 2  # at 0 s and 5 s
    assert all(at < failed for at in uploads), "the engine went on after the cut"


@docker
def test_pull_from_a_registry_answering_500_backs_off_within_the_limit(
    engine: Engine,
) -> None:
    with FakeRegistry(answer_500=True) as registry:
        reference = ImageRef(f"{registry.address}/layerkeep-test/never", "1")
        credentials = Credentials(registry.address)
        lines: list[str] = []
        slept = RecordedSleep()
        with pytest.raises(RegistryUnavailable) as raised:
            pull_tag(engine, reference, credentials,
                     Retries(3, lines.append, time_limit=60, sleep=slept))
        assert slept.delays == [1, 2]
        message = raised.value.message
        assert message == (
            f"pull {reference} failed after 3 attempts in {seconds_said(message)} s: {ERROR_500}"
        )
        assert seconds_said(message) >= 3  # the backoffs, slept for real
        assert len(lines) == 2, lines
        for n, line in enumerate(lines, start=1):
            assert re.fullmatch(
                rf"pull {re.escape(str(reference))}: attempt {n}/3 failed after \d+ s "
                rf"\({ERROR_500}\); retrying in {n} s",
                line,
            ), line

        # No attempt starts when its backoff would end past the limit: after the second
        # attempt, 2 s more would end past it.
        slept = RecordedSleep()
        with pytest.raises(RegistryUnavailable) as raised:
            pull_tag(engine, reference, credentials, Retries(5, quiet, time_limit=2, sleep=slept))
        assert slept.delays == [1]
        assert raised.value.attempts == 2
        message = raised.value.message
        assert message == (
            f"pull {reference} failed after 2 attempts in {seconds_said(message)} s: "
            f"{ERROR_500}; another attempt would start past the 2 s time limit"
        )
        assert seconds_said(message) >= 1  # the one backoff, slept for real


class _Recorded:
    """Replays what the real engine sent on a push to a registry answering 500.

    A stand-in, because the real engine spends about 50 s per attempt on it (5 tries
    per layer); the one-attempt case is on the real engine above.
    """

    def __init__(self) -> None:
        self.deadlines: list[float | None] = []

    def push(
        self, reference: str, *, auth: Mapping[str, str] | None, deadline: float | None
    ) -> Iterator[Mapping[str, Any]]:
        self.deadlines.append(deadline)
        yield {"status": f"The push refers to repository [{reference.rsplit(':', 1)[0]}]"}
        for layer in ("226486379e9c", "5f70bf18a086"):
            yield {"status": "Preparing", "progressDetail": {}, "id": layer}
        for wait in (5, 10, 15, 20):
            for left in range(wait, 0, -1):
                for layer in ("226486379e9c", "5f70bf18a086"):
                    unit = "second" if left == 1 else "seconds"
                    yield {"status": f"Retrying in {left} {unit}", "id": layer}
        raise DockerOperationError(f"push {reference} failed: {ERROR_500}")


def test_the_engine_retry_countdown_is_one_line_per_attempt() -> None:
    recorded = _Recorded()
    reference = ImageRef("127.0.0.1:5/app", "1")
    lines: list[str] = []
    with pytest.raises(RegistryUnavailable) as raised:
        push_tag(cast(Engine, recorded), reference, Credentials("127.0.0.1:5"),
                 Retries(3, lines.append, time_limit=300, sleep=quiet_sleep))
    engine_lines = [line for line in lines if "the engine retries it itself" in line]
    assert [line.split(": ")[1] for line in engine_lines] == [
        "attempt 1/3", "attempt 2/3", "attempt 3/3"
    ]
    assert len(lines) == 5  # 3 of those, 2 "retrying in"; 200 countdown records each
    assert raised.value.message.startswith(f"push {reference} failed after 3 attempts in ")
    # Every attempt is handed the same deadline: the limit is for the whole push.
    assert len(set(recorded.deadlines)) == 1
    assert recorded.deadlines[0] is not None


def quiet_sleep(_: float) -> None:
    pass


# --- a healthy registry --------------------------------------------------------------


@docker
def test_a_push_cut_mid_upload_leaves_no_tag_and_the_next_push_works(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    with running_registry(tmp_path / "registry") as registry:
        reference = ImageRef(f"{registry.address}/{unique_repository}/python", "1")
        engine.tag_image("python:3.11-slim", str(reference))  # about 8 s to push here
        try:
            started = time.monotonic()
            with pytest.raises(RegistryUnavailable) as raised:
                push_tag(engine, reference, Credentials(registry.address),
                         Retries(3, quiet, time_limit=2))
            assert time.monotonic() - started < 2 + CUT_SLACK
            assert raised.value.message.endswith("stopped at the 2 s time limit")
            path = f"{unique_repository}/python"
            assert registry.digest_of(path, "1") is None

            pushed = push_tag(engine, reference, Credentials(registry.address),
                              Retries(1, quiet, time_limit=120))
            assert pushed.attempts == 1
            assert registry.digest_of(path, "1") == pushed.digest
        finally:
            engine.remove_image(str(reference), prune=False)


def test_the_time_limit_is_a_setting(tmp_path: Path) -> None:
    def load(**environ: str) -> int:
        settings = load_settings(tmp_path, environ, git_facts=lambda _: GitFacts("", ""))
        return settings.push_timeout

    assert load() == 300
    assert load(LAYERKEEP_PUSH_TIMEOUT="45") == 45
    for bad in ("0", "-5", "2.5", "²", "86401"):
        with pytest.raises(ConfigError) as raised:
            load(LAYERKEEP_PUSH_TIMEOUT=bad)
        assert "LAYERKEEP_PUSH_TIMEOUT" in raised.value.one_line()


def test_a_registry_refusing_zstd_layers_gets_the_way_out(tmp_path: Path) -> None:
    # Docker Distribution takes zstd layers, so the refusals here are older registries'
    # words, as the build's error line carries them.
    def hint(message: str, **environ: str) -> str:
        settings = load_settings(tmp_path, environ, git_facts=lambda _: GitFacts("", ""))
        return zstd_refused_hint(settings, message)

    refused = [
        "failed to push: unexpected status: 415 Unsupported Media Type",
        "manifest invalid: layer media type application/vnd.oci.image.layer.v1.tar+zstd",
        "error writing manifest: MANIFEST_INVALID",
    ]
    for message in refused:
        assert "LAYERKEEP_LAYER_COMPRESSION=gzip" in hint(message)
        assert hint(message, LAYERKEEP_LAYER_COMPRESSION="gzip") == ""
    assert hint("no space left on device") == ""
    assert hint("dial tcp 127.0.0.1:5000: connect: connection refused") == ""
