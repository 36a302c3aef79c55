"""A real Docker Distribution registry (Debian's docker-registry) on 127.0.0.1 for tests.

    with running_registry(tmp_path) as registry:               # no auth
    with running_registry(tmp_path, user="alice", password="s3cret") as registry:
        registry.address        # "127.0.0.1:PORT", what LAYERKEEP_REGISTRY takes
        registry.get("/v2/_catalog")   # (status, parsed JSON or None, headers)

The engine treats 127.0.0.0/8 registries as insecure, so plain HTTP works.

    with running_registry(tmp_path, delete=False) as registry:  # deletes refused (405)
    with token_server(tmp_path, user="alice", password="s3cret") as tokens, \
            running_registry(tmp_path, token=tokens) as registry:  # Bearer token auth

A token server runs in the test process and issues real JWTs (RS256, with its
certificate in the ``x5c`` header), which the registry verifies against that
certificate (``auth: token: rootcertbundle``), as it does a production token server's.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REGISTRY_BINARY = "docker-registry"
MANIFEST_TYPES = ",".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)


@dataclass
class Registry:
    """A registry process and how to reach it."""

    address: str
    user: str
    password: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, *, method: str = "GET") -> tuple[int, Any, Mapping[str, str]]:
        """Call the registry's HTTP API with the test credentials."""
        request = urllib.request.Request(f"http://{self.address}{path}", method=method)
        request.add_header("Accept", MANIFEST_TYPES)
        if self.user:
            token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - loopback
                body = answer.read()
                status, headers = answer.status, dict(answer.headers)
        except urllib.error.HTTPError as error:
            body, status, headers = error.read(), error.code, dict(error.headers)
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        return status, data, headers

    def digest_of(self, repository: str, tag: str) -> str | None:
        """The manifest digest a tag resolves to, or None."""
        status, _, headers = self.get(f"/v2/{repository}/manifests/{tag}", method="HEAD")
        return headers.get("Docker-Content-Digest") if status == 200 else None

    def stop(self) -> None:
        """Stop the registry (what a registry outage looks like)."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def running_registry(
    folder: Path,
    *,
    user: str = "",
    password: str = "",
    port: int = 0,
    delete: bool = True,
    token: TokenServer | None = None,
) -> Iterator[Registry]:
    """Start a registry storing into ``folder``; htpasswd auth when ``user`` is given.

    ``delete`` False refuses manifest deletes (storage.delete.enabled: false); ``token``
    makes it ask for Bearer tokens from that server (``get`` then answers 401).
    """
    binary = shutil.which(REGISTRY_BINARY)
    if binary is None:
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    auth = ""
    if user:
        hashed = subprocess.run(
            ["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True
        ).stdout
        (folder / "htpasswd").write_text(hashed)
        auth = f"auth:\n  htpasswd:\n    realm: layerkeep-test\n    path: {folder / 'htpasswd'}\n"
    if token is not None:
        auth = (
            f"auth:\n  token:\n    realm: {token.realm}\n    service: {token.service}\n"
            f"    issuer: {token.issuer}\n    rootcertbundle: {token.certificate}\n"
        )
    config = folder / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {folder / 'data'}\n"
        f"  delete:\n    enabled: {'true' if delete else 'false'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n{auth}"
    )
    log = folder / "registry.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [binary, "serve", str(config)], stdout=output, stderr=subprocess.STDOUT
        )
    registry = Registry(f"127.0.0.1:{port}", user, password, process, log)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, _, _ = registry.get("/v2/")
            except (urllib.error.URLError, ConnectionError):
                status = 0
            # A token registry turns everyone away until they bring a token.
            if status == 200 or (token is not None and status == 401):
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield registry
    finally:
        registry.stop()


# --- a token server for `auth: token:` ---------------------------------------------------


@dataclass(frozen=True)
class TokenRequest:
    """What a client asked the token server, and whether it was given a token."""

    service: str
    scopes: tuple[str, ...]
    user: str  # "" when it sent no login
    granted: bool


@dataclass
class TokenServer:
    """Issues JWTs for a registry, as a Docker token server does (the token spec).

    Requests must bring ``user``/``password`` as Basic auth when a user is set. A token
    grants what each ``scope`` asks, limited to ``actions`` when given; it lives
    ``lifetime`` seconds (the registry allows 60 s of clock skew on top), and is sent
    under ``answer_key`` (``token``, or ``access_token`` as OAuth2 servers do).
    """

    realm: str
    certificate: Path
    key: rsa.RSAPrivateKey = field(repr=False)
    user: str = ""
    password: str = field(default="", repr=False)
    service: str = "layerkeep-test-registry"
    issuer: str = "layerkeep-test-issuer"
    actions: tuple[str, ...] | None = None
    lifetime: int = 300
    answer_key: str = "token"
    requests: list[TokenRequest] = field(default_factory=list)
    issued: list[str] = field(default_factory=list, repr=False)  # every token, in order

    def answer(self, query: str, authorization: str) -> tuple[int, dict[str, Any]]:
        """The status and JSON body for one GET of the realm."""
        params = urllib.parse.parse_qs(query)
        scopes = tuple(params.get("scope", []))
        user, password = "", ""
        if authorization.startswith("Basic "):
            user, _, password = base64.b64decode(authorization[6:]).decode().partition(":")
        granted = not self.user or (user, password) == (self.user, self.password)
        self.requests.append(
            TokenRequest(params.get("service", [""])[0], scopes, user, granted)
        )
        if not granted:
            return 401, {"details": "incorrect username or password"}
        self.issued.append(self.issue(scopes))
        return 200, {self.answer_key: self.issued[-1], "expires_in": self.lifetime}

    def issue(self, scopes: tuple[str, ...]) -> str:
        """A signed JWT granting ``scopes`` (``type:name:action,action``)."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = [a for a in actions.split(",") if self.actions is None or a in self.actions]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        der = x509.load_pem_x509_certificate(self.certificate.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
        claims = {
            "iss": self.issuer,
            "sub": self.user,
            "aud": self.service,
            "exp": now + self.lifetime,
            "nbf": now - 1,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signed = f"{_b64url(header)}.{_b64url(claims)}"
        signature = self.key.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signed}.{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


def _b64url(data: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def self_signed(folder: Path, name: str) -> tuple[rsa.RSAPrivateKey, Path, Path]:
    """An RSA key and a self-signed certificate for ``name`` (also a DNS and IP SAN).

    Returns the key and the PEM files of the certificate and the key.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key, cert_path, key_path


@contextlib.contextmanager
def token_server(folder: Path, *, user: str = "", password: str = "") -> Iterator[TokenServer]:
    """Serve tokens on 127.0.0.1 (``/token``), signed by a key made for this server."""
    key, certificate, _ = self_signed(folder / "token-issuer", "token-issuer")
    server = _TokenHTTPServer(("127.0.0.1", 0), _TokenHandler)
    tokens = TokenServer(
        f"http://127.0.0.1:{server.server_address[1]}/token", certificate, key, user, password
    )
    server.tokens = tokens
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield tokens
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _TokenHTTPServer(ThreadingHTTPServer):
    tokens: TokenServer


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenHTTPServer

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        status, body = (
            self.server.tokens.answer(query, self.headers.get("Authorization", ""))
            if path == "/token"
            else (404, {})
        )
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_: object) -> None:
        pass
