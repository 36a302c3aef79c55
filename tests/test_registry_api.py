"""The registry API client against a real Docker Distribution registry on 127.0.0.1.

Debian's docker-registry (Distribution 2.8, ``registry_setup``) serves every test here,
anonymous, behind htpasswd (Basic) or behind a token server (Bearer) that runs in this
process and issues real JWTs the registry verifies. Blobs and manifests are uploaded by
the client itself; the one test marked ``docker`` pushes an image with the engine and
pulls back the manifest the client rewrote.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path

import pytest
from registry_setup import Registry, TokenServer, running_registry, self_signed, token_server

from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.registry_api import (
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    RegistryClient,
    api_base,
    digest_of,
)
from layerkeep.core.registry_api_errors import (
    DeleteDisabled,
    DigestMismatch,
    RegistryAPIError,
)
from layerkeep.core.registry_credentials import Credentials
from layerkeep.core.registry_failures import (
    RegistryAuthError,
    RegistryUnavailable,
    TagNotFound,
    with_retries,
)

docker = pytest.mark.docker
PASSWORD = "pa55-w0rd/with:odd@chars"  # noqa: S105 - the test registries'
IDENTITY_TOKEN = "refresh-token-value"  # noqa: S105 - the test helper's
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"


def client_for(address: str, user: str = "", password: str = "", **environ: str) -> RegistryClient:
    """A client of the registry at ``address``; ``environ`` is all it sees of the process's."""
    return RegistryClient(Credentials(address, user, password), environ=environ, timeout=5)


def small_image(client: RegistryClient, repository: str, tag: str, note: str = "") -> str:
    """Upload a config blob and a manifest (no layers) under ``tag``; its digest."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {"Labels": {"note": note}},
         "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
         "config": {"mediaType": CONFIG_TYPE, "size": len(config),
                    "digest": client.upload_blob(repository, config)},
         "layers": []}
    ).encode()
    return client.put_manifest(repository, tag, manifest, DOCKER_MANIFEST)


def blob_file(registry_folder: Path, digest: str) -> Path:
    """Where Distribution's filesystem storage keeps a blob's content."""
    hex_digest = digest.removeprefix("sha256:")
    return (
        registry_folder / "data/docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest
        / "data"
    )


def quiet(_: str) -> None:
    pass


# --- where and how it connects ----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "base"),
    [
        ("127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("127.8.9.10", "http://127.8.9.10"),
        ("localhost:5000", "http://localhost:5000"),
        ("[::1]:5000", "http://[::1]:5000"),
        ("ghcr.io", "https://ghcr.io"),
        ("registry.example.com:5000", "https://registry.example.com:5000"),
        ("10.0.0.5:5000", "https://10.0.0.5:5000"),
        ("[2001:db8::1]:5000", "https://[2001:db8::1]:5000"),
        ("docker.io", "https://registry-1.docker.io"),
    ],
)
def test_plain_http_only_for_loopback_as_dockerd(host: str, base: str) -> None:
    assert api_base(host) == base


def test_https_is_verified(tmp_path: Path) -> None:
    """A registry on HTTPS with a certificate nobody trusts is refused, in one line."""
    _, certificate, key = self_signed(tmp_path, "untrusted")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    address = f"127.0.0.1:{server.server_address[1]}"
    try:
        client = RegistryClient(Credentials(address), environ={}, timeout=5, plain_http=False)
        with pytest.raises(RegistryUnavailable) as caught:
            client.get_manifest("app", "v1")
    finally:
        server.shutdown()
        server.server_close()
    assert "certificate verify failed" in caught.value.message
    assert "\n" not in caught.value.one_line()
    assert "TLS" in caught.value.hint


def test_an_unreachable_registry_is_unavailable_at_once() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(RegistryUnavailable) as caught:
        client_for(address).get_manifest("app", "v1")
    assert time.monotonic() - started < 2
    assert caught.value.message == (
        f"get manifest {address}/app:v1 failed: {address}: Connection refused"
    )


def test_a_registry_that_never_answers_times_out() -> None:
    """The kernel accepts the connection; nobody ever reads the request."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        client = RegistryClient(Credentials(address), environ={}, timeout=1)
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable) as caught:
            client.blob_exists("app", digest_of(b""))
        assert time.monotonic() - started < 3
    assert "no answer within 1 s (timed out)" in caught.value.message


# --- content ----------------------------------------------------------------------------


def test_blob_and_manifest_round_trip(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry, client_for(registry.address) as client:
        content = b"layerkeep " * 1000
        digest = client.upload_blob("team/app", content)
        assert digest == digest_of(content)
        assert client.blob_exists("team/app", digest)
        assert not client.blob_exists("team/app", digest_of(b"never uploaded"))
        assert client.get_blob("team/app", digest) == content

        manifest = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                        "size": len(content), "digest": digest},
             "layers": []}
        ).encode()
        stored = client.put_manifest("team/app", "v1", manifest, OCI_MANIFEST)
        assert stored == digest_of(manifest) == registry.digest_of("team/app", "v1")

        by_tag = client.get_manifest("team/app", "v1")
        by_digest = client.get_manifest("team/app", stored)
        assert by_tag == by_digest
        assert (by_tag.content, by_tag.media_type, by_tag.digest) == (
            manifest, OCI_MANIFEST, stored,
        )
        assert client.manifest_digest("team/app", "v1") == stored
        assert client.manifest_digest("team/app", "v2") is None
        assert client.manifest_digest("team/other", "v1") is None
        with pytest.raises(TagNotFound) as caught:
            client.get_manifest("team/app", "v2")
    assert caught.value.message == (
        f"get manifest {registry.address}/team/app:v2 failed: "
        "404 Not Found MANIFEST_UNKNOWN: manifest unknown"
    )


def test_a_registry_refusing_a_manifest_says_why(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry, client_for(registry.address) as client:
        manifest = json.dumps(
            {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
             "config": {"mediaType": CONFIG_TYPE, "size": 2, "digest": digest_of(b"{}")},
             "layers": []}
        ).encode()
        with pytest.raises(RegistryAPIError) as caught:
            client.put_manifest("team/app", "v1", manifest, DOCKER_MANIFEST)
    error = caught.value
    assert (error.host, error.repository, error.reference, error.status) == (
        registry.address, "team/app", "v1", 400,
    )
    assert "MANIFEST_BLOB_UNKNOWN" in error.message


def test_a_blob_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    """The registry's storage is damaged on disk; the client notices, the registry not."""
    with running_registry(tmp_path) as registry, client_for(registry.address) as client:
        digest = client.upload_blob("team/app", b'{"architecture": "amd64"}')
        damaged = b'{"architecture": "arm64"}'
        blob_file(tmp_path, digest).write_bytes(damaged)
        with pytest.raises(DigestMismatch) as caught:
            client.get_blob("team/app", digest)
    assert caught.value.message == (
        f"get blob {registry.address}/team/app@{digest} failed: the content's digest is "
        f"{digest_of(damaged)}, not {digest}"
    )


def test_a_manifest_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry, client_for(registry.address) as client:
        digest = small_image(client, "team/app", "v1", note="original")
        stored = blob_file(tmp_path, digest)
        stored.write_bytes(stored.read_bytes().replace(b'"layers"', b'"Layers"'))
        for reference in ("v1", digest):
            with pytest.raises(DigestMismatch):
                client.get_manifest("team/app", reference)


def test_a_failing_registry_is_unavailable(tmp_path: Path) -> None:
    """Storage the registry cannot read (a blob's link in the repository is a folder)."""
    with running_registry(tmp_path) as registry, client_for(registry.address) as client:
        digest = client.upload_blob("team/app", b"content")
        link = (
            tmp_path / "data/docker/registry/v2/repositories/team/app/_layers"
            / digest.replace(":", "/") / "link"
        )
        link.unlink()
        link.mkdir()
        with pytest.raises(RegistryUnavailable) as caught:
            client.get_blob("team/app", digest)
    assert caught.value.status == 500
    assert caught.value.message.startswith(
        f"get blob {registry.address}/team/app@{digest} failed: 500 Internal Server Error"
    )


# --- tags and deletes -------------------------------------------------------------------


class PagingProxy(ThreadingHTTPServer):
    """Pages a real registry's tag list as Distribution 3 and the OCI spec do.

    Distribution 2.8 (Debian's) answers every tag at once and ignores ``n``; this
    proxy asks it for the list and gives it ``n`` at a time, after ``last``, with a
    ``Link: <...>; rel="next"`` header while more follow. Every query is recorded.
    """

    def __init__(self, registry: Registry) -> None:
        super().__init__(("127.0.0.1", 0), _PagingHandler)
        self.registry = registry
        self.queries: list[dict[str, str]] = []
        self.address = f"127.0.0.1:{self.server_address[1]}"


class _PagingHandler(BaseHTTPRequestHandler):
    server: PagingProxy

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        asked = dict(urllib.parse.parse_qsl(query))
        self.server.queries.append(asked)
        _, everything, _ = self.server.registry.get(path)
        tags = sorted(everything["tags"])
        start = tags.index(asked["last"]) + 1 if "last" in asked else 0
        page = tags[start : start + int(asked["n"])]
        body = json.dumps({"name": everything["name"], "tags": page}).encode()
        self.send_response(200)
        if start + len(page) < len(tags):
            following = urllib.parse.urlencode({"n": asked["n"], "last": page[-1]})
            self.send_header("Link", f'<{path}?{following}>; rel="next"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def paging_proxy(registry: Registry) -> Iterator[PagingProxy]:
    proxy = PagingProxy(registry)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_tags_follow_the_link_pages(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d", "e"]
    with running_registry(tmp_path) as registry:
        with client_for(registry.address) as client:
            for name in names:
                small_image(client, "team/app", name, note=name)
            # Distribution 2.8 ignores n and answers every tag at once.
            assert sorted(client.tags("team/app", page_size=2)) == names
        with paging_proxy(registry) as proxy, client_for(proxy.address) as client:
            assert client.tags("team/app", page_size=2) == names
    assert proxy.queries == [
        {"n": "2"}, {"n": "2", "last": "b"}, {"n": "2", "last": "d"},
    ]


def test_delete_by_digest(tmp_path: Path) -> None:
    with running_registry(tmp_path) as registry, client_for(registry.address) as client:
        kept = small_image(client, "team/app", "kept", note="kept")
        digest = small_image(client, "team/app", "old", note="old")
        client.delete_manifest("team/app", digest)
        assert client.manifest_digest("team/app", "old") is None
        with pytest.raises(TagNotFound):
            client.get_manifest("team/app", digest)
        with pytest.raises(TagNotFound):
            client.delete_manifest("team/app", digest)
        assert client.manifest_digest("team/app", "kept") == kept
        assert client.tags("team/app") == ["kept"]


def test_delete_on_a_registry_that_allows_none_says_how_to_allow_it(tmp_path: Path) -> None:
    with running_registry(tmp_path, delete=False) as registry, client_for(
        registry.address
    ) as client:
        digest = small_image(client, "team/app", "v1")
        with pytest.raises(DeleteDisabled) as caught:
            client.delete_manifest("team/app", digest)
        assert client.manifest_digest("team/app", "v1") == digest
    error = caught.value
    assert (error.status, error.reference) == (405, digest)
    assert "405 Method Not Allowed UNSUPPORTED" in error.message
    assert "storage.delete.enabled: true" in error.one_line()


# --- Basic auth and the docker login ----------------------------------------------------


def test_basic_auth(tmp_path: Path) -> None:
    with running_registry(tmp_path, user="alice", password=PASSWORD) as registry:
        with client_for(registry.address, "alice", PASSWORD) as client:
            digest = small_image(client, "team/app", "v1")
            assert client.get_manifest("team/app", "v1").digest == digest
        wrong_password = client_for(registry.address, "alice", "wrong-" + PASSWORD)
        with wrong_password, pytest.raises(RegistryAuthError) as wrong:
            wrong_password.get_manifest("team/app", "v1")
        anonymous = client_for(registry.address)
        with anonymous, pytest.raises(RegistryAuthError) as none:
            anonymous.get_manifest("team/app", "v1")
    shown = wrong.value.one_line()
    assert "user alice" in shown
    assert "401 Unauthorized UNAUTHORIZED: authentication required" in shown
    assert "check LAYERKEEP_REGISTRY_USER" in shown
    assert "pa55" not in shown
    assert "the registry asks for a login" in none.value.message
    assert f"docker login {registry.address}" in none.value.hint


def write_docker_config(folder: Path, config: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


HELPER = """#!/bin/sh
read -r server
if [ "$server" = "{server}" ]; then
    printf '{{"ServerURL": "%s", "Username": "{user}", "Secret": "{secret}"}}' "$server"
else
    echo "credentials not found in native keychain"
    exit 1
fi
"""


@pytest.fixture
def helper_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on PATH for docker-credential-* helpers (docker-py finds them there)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


def add_helper(folder: Path, name: str, *, server: str, user: str, secret: str) -> None:
    helper = folder / f"docker-credential-{name}"
    helper.write_text(HELPER.format(server=server, user=user, secret=secret))
    helper.chmod(0o755)


def test_without_a_user_the_docker_login_is_used(tmp_path: Path, helper_folder: Path) -> None:
    """From ``auths`` (base64 user:password), or from a credential helper."""
    with running_registry(tmp_path / "registry", user="alice", password=PASSWORD) as registry:
        encoded = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        plain = write_docker_config(
            tmp_path / "auths", {"auths": {f"http://{registry.address}": {"auth": encoded}}}
        )
        with client_for(registry.address, DOCKER_CONFIG=str(plain)) as client:
            digest = small_image(client, "team/app", "v1")

        add_helper(helper_folder, "layerkeeptest", server=registry.address, user="alice",
                   secret=PASSWORD)
        helped = write_docker_config(
            tmp_path / "helper", {"credHelpers": {registry.address: "layerkeeptest"}}
        )
        with client_for(registry.address, DOCKER_CONFIG=str(helped)) as client:
            assert client.manifest_digest("team/app", "v1") == digest

        add_helper(helper_folder, "layerkeepwrong", server=registry.address, user="alice",
                   secret="not-" + PASSWORD)
        wrong = write_docker_config(tmp_path / "wrong", {"credsStore": "layerkeepwrong"})
        client = client_for(registry.address, DOCKER_CONFIG=str(wrong))
        with client, pytest.raises(RegistryAuthError) as caught:
            client.get_manifest("team/app", "v1")
    assert "user alice of `docker login`" in caught.value.message
    assert f"docker login {registry.address}" in caught.value.hint
    assert PASSWORD not in caught.value.one_line()


def test_docker_logins_layerkeep_cannot_use_are_errors(
    tmp_path: Path, helper_folder: Path
) -> None:
    """A helper that is not installed, or an identity token: one line, no warning."""
    with running_registry(tmp_path / "registry", user="alice", password=PASSWORD) as registry:
        missing = write_docker_config(tmp_path / "missing", {"credsStore": "layerkeep-absent"})
        client = client_for(registry.address, DOCKER_CONFIG=str(missing))
        with client, pytest.raises(DockerOperationError) as absent:
            client.get_manifest("team/app", "v1")
        add_helper(helper_folder, "layerkeeptoken", server=registry.address, user="<token>",
                   secret=IDENTITY_TOKEN)
        token = write_docker_config(tmp_path / "token", {"credsStore": "layerkeeptoken"})
        client = client_for(registry.address, DOCKER_CONFIG=str(token))
        with client, pytest.raises(DockerOperationError) as identity:
            client.get_manifest("team/app", "v1")
    assert "docker-credential-layerkeep-absent not installed" in absent.value.message
    assert "identity token" in identity.value.message
    assert IDENTITY_TOKEN not in identity.value.one_line()


# --- Bearer tokens ----------------------------------------------------------------------


@contextlib.contextmanager
def token_registry(folder: Path) -> Iterator[tuple[TokenServer, Registry]]:
    with (
        token_server(folder / "tokens", user="alice", password=PASSWORD) as tokens,
        running_registry(folder / "registry", token=tokens) as registry,
    ):
        yield tokens, registry


def test_bearer_tokens_from_the_realm_kept_per_scope(tmp_path: Path) -> None:
    with (
        token_registry(tmp_path) as (tokens, registry),
        client_for(registry.address, "alice", PASSWORD) as client,
    ):
        digest = small_image(client, "team/app", "v1")
        assert client.get_manifest("team/app", "v1").digest == digest
        assert client.get_manifest("team/app", digest).digest == digest
        assert client.tags("team/app") == ["v1"]
        client.delete_manifest("team/app", digest)
        assert client.manifest_digest("team/app", "v1") is None
    # The registry's challenge names the actions in either order ("push,pull" or
    # "pull,push", from a Go map): the client asks for the scope the challenge names.
    asked = [(actions_of(each.scopes), each.user, each.service) for each in tokens.requests]
    assert asked == [
        ((("repository:team/app", {"pull"}),), "alice", tokens.service),
        ((("repository:team/app", {"pull", "push"}),), "alice", tokens.service),
        ((("repository:team/app", {"delete"}),), "alice", tokens.service),
    ]


def actions_of(scopes: tuple[str, ...]) -> tuple[tuple[str, set[str]], ...]:
    """Each scope as (resource, its set of actions)."""
    split = (scope.rsplit(":", 1) for scope in scopes)
    return tuple((resource, set(actions.split(","))) for resource, actions in split)


def test_a_token_server_may_answer_access_token(tmp_path: Path) -> None:
    with token_registry(tmp_path) as (tokens, registry):
        tokens.answer_key = "access_token"
        with client_for(registry.address, "alice", PASSWORD) as client:
            assert client.manifest_digest("team/app", "v1") is None
    assert len(tokens.requests) == 1


def refuses(registry: Registry, token: str, path: str) -> bool:
    """Whether the registry turns ``token`` away (401) for a GET of ``path``."""
    request = urllib.request.Request(f"http://{registry.address}{path}")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10):  # noqa: S310 - loopback
            return False
    except urllib.error.HTTPError as error:
        return error.code == 401


def test_an_expired_token_is_replaced(tmp_path: Path) -> None:
    path = "/v2/team/app/manifests/v1"
    with token_registry(tmp_path) as (tokens, registry):
        # The registry allows 60 s of clock skew: this token is good for about 2 s.
        tokens.lifetime = -58
        with client_for(registry.address, "alice", PASSWORD) as client:
            assert client.manifest_digest("team/app", "v1") is None
            asked = len(tokens.requests)
            held = tokens.issued[-1]
            tokens.lifetime = 300
            # Until the registry itself refuses the token the client holds (polled).
            deadline = time.monotonic() + 30
            while not refuses(registry, held, path):
                assert time.monotonic() < deadline, "the token never expired"
                time.sleep(0.2)
            assert client.manifest_digest("team/app", "v1") is None
    # One more token, for the refused one; the new one was good.
    assert len(tokens.requests) == asked + 1
    assert tokens.requests[-1].granted


def test_the_token_server_refusing_our_login(tmp_path: Path) -> None:
    with (
        token_registry(tmp_path) as (tokens, registry),
        client_for(registry.address, "alice", "wrong-" + PASSWORD) as client,
        pytest.raises(RegistryAuthError) as caught,
    ):
        client.get_manifest("team/app", "v1")
    shown = caught.value.one_line()
    assert f"the token server {tokens.realm} answered 401 Unauthorized" in shown
    assert "pa55" not in shown
    assert tokens.requests[0].user == "alice"


def test_a_pull_only_token_reads_and_skips_existing_blobs(tmp_path: Path) -> None:
    """An upload of a blob the repository has asks only whether it exists."""
    with token_registry(tmp_path) as (tokens, registry):
        with client_for(registry.address, "alice", PASSWORD) as client:
            existing = client.upload_blob("team/app", b"existing")
        tokens.actions = ("pull",)
        with client_for(registry.address, "alice", PASSWORD) as client:
            assert client.upload_blob("team/app", b"existing") == existing
            with pytest.raises(RegistryAuthError) as caught:
                client.upload_blob("team/app", b"new")
    assert "on upload blob" in caught.value.message
    assert "it needs push access to team/app" in caught.value.hint


# --- with the callers' retry helper -----------------------------------------------------


def test_with_retries_retries_only_what_is_transient(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = f"127.0.0.1:{probe.getsockname()[1]}"
    slept: list[float] = []

    def retried(client: RegistryClient, tag: str) -> tuple[object, int]:
        return with_retries(
            lambda _: client.get_manifest("team/app", tag), action="get manifest",
            reference=f"{client.host}/team/app:{tag}", credentials=Credentials(client.host),
            attempts=2, log=quiet, sleep=slept.append,
        )

    with pytest.raises(RegistryUnavailable) as unavailable:
        retried(client_for(refused), "v1")
    assert (unavailable.value.attempts, slept) == (2, [1.0])

    with running_registry(tmp_path, user="alice", password=PASSWORD) as registry:
        with pytest.raises(RegistryAuthError):
            retried(client_for(registry.address, "alice", "wrong"), "v1")
        with pytest.raises(TagNotFound):
            retried(client_for(registry.address, "alice", PASSWORD), "v1")
    assert slept == [1.0]


# --- with the engine --------------------------------------------------------------------


@docker
def test_a_rewritten_config_is_pulled_by_the_engine(engine: Engine, tmp_path: Path) -> None:
    """Push an image, give its tag a new config (same layers), pull it back: it has it."""
    mark = uuid.uuid4().hex
    context = tmp_path / "context"
    context.mkdir()
    (context / "hello.txt").write_text(mark)
    (context / "Dockerfile").write_text("FROM scratch\nCOPY hello.txt /hello.txt\n")
    with running_registry(tmp_path / "registry") as registry:
        repository = f"layerkeep-test/rewrite-{mark[:8]}"
        reference = f"{registry.address}/{repository}:v1"
        engine.build(context, tag=reference)
        try:
            for _ in engine.push(reference):
                pass
            before = engine.image_attrs(reference)
            assert before is not None
            with client_for(registry.address) as client:
                pushed = client.get_manifest(repository, "v1")
                manifest = json.loads(pushed.content)
                config = json.loads(client.get_blob(repository, manifest["config"]["digest"]))
                config["config"]["Labels"] = {"io.layerkeep.test.rewritten": mark}
                new_config = json.dumps(config).encode()
                manifest["config"].update(
                    digest=client.upload_blob(repository, new_config), size=len(new_config)
                )
                content = json.dumps(manifest).encode()
                digest = client.put_manifest(repository, "v1", content, pushed.media_type)
                assert client.manifest_digest(repository, "v1") == digest != pushed.digest

            assert engine.remove_image(reference)
            for _ in engine.pull(reference):
                pass
            after = engine.image_attrs(reference)
            assert after is not None
            assert after["Config"]["Labels"] == {"io.layerkeep.test.rewritten": mark}
            assert after["Id"] == digest_of(new_config)
            assert after["RootFS"]["Layers"] == before["RootFS"]["Layers"]
            assert after["RepoDigests"] == [f"{registry.address}/{repository}@{digest}"]
        finally:
            engine.remove_image(reference)

