"""A small client of the Docker Registry HTTP API V2, for what the engine cannot do.

Rewriting a pushed image's config in the registry and pruning cache tags need the
registry itself: manifests by tag or digest, blobs, tags and deletes. Content is held in
memory (manifests and configs are small), and every digest read is checked against it.

Scheme: HTTPS with TLS verification (requests' CA bundle; REQUESTS_CA_BUNDLE names a
private CA), except plain HTTP for loopback hosts (127.0.0.0/8, ::1, localhost), which
dockerd treats as insecure by default, or when the caller says so (``plain_http``).

Auth: anonymous until the registry answers 401, then as its ``WWW-Authenticate`` asks:
``Basic`` with our login, or ``Bearer``: a token from its realm for its service and
scope (with our login when we have one), kept per scope for the client's life and asked
for again when the registry refuses it (tokens expire). Our login is the one
:func:`~layerkeep.core.registry_credentials.credentials_for` gives; without a user, what
`docker login` stored for the host (:func:`~layerkeep.core.engine.docker_login`, read
only once a registry asks for a login).

Errors are one line, never with the password or a token in it: RegistryUnavailable (no
connection, a timeout, 5xx or 429), RegistryAuthError (refused after authenticating),
TagNotFound (no such manifest), DeleteDisabled, DigestMismatch, and RegistryAPIError
for any other refusal (:mod:`layerkeep.core.registry_api_errors`). Nothing is retried
here (the 401 challenge aside): callers wrap a call in
:func:`~layerkeep.core.registry_failures.with_retries`, which retries what is transient.
It sorts these errors by their text, as it does the engine's: auth and "no such
manifest" come out as RegistryAuthError and TagNotFound again, but DeleteDisabled,
DigestMismatch and RegistryAPIError as a plain DockerOperationError without their hint.

Past 450 lines on purpose: it is one class, whose requests, 401 answers and errors share
one session, one login and one masking of secrets.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from layerkeep.core.closing import Closing
from layerkeep.core.engine import docker_login
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.registry_api_errors import (
    DeleteDisabled,
    DigestMismatch,
    RegistryAPIError,
    reference_name,
    registry_says,
    root_reason,
)
from layerkeep.core.registry_credentials import DOCKER_HUB, Credentials
from layerkeep.core.registry_failures import (
    RegistryAuthError,
    RegistryUnavailable,
    TagNotFound,
)
from layerkeep.core.secrets import Masker

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST_TYPES = (DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX)
# Docker Hub's registry API is not served under its name.
_API_HOSTS = {DOCKER_HUB: "registry-1.docker.io"}
_HASHES: Mapping[str, Callable[[bytes], Any]] = {
    "sha256": hashlib.sha256,
    "sha512": hashlib.sha512,
}
# What a request needs in a Bearer token's scope, by method (Distribution's rule).
_ACTIONS = {"GET": "pull", "HEAD": "pull", "POST": "pull,push", "PUT": "pull,push"}
_CHALLENGE_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^\s,]*))')
@dataclass(frozen=True)
class Manifest:
    """A manifest as the registry holds it: its bytes, media type and digest."""

    content: bytes
    media_type: str
    digest: str


@dataclass(frozen=True)
class _Call:
    """What a request is for, as errors name it: ``get manifest`` of a repository's reference."""

    action: str
    repository: str
    reference: str


def is_loopback(host: str) -> bool:
    """Whether ``host`` (with an optional port) is this machine: 127.0.0.0/8, ::1, localhost."""
    name = host[1:].partition("]")[0] if host.startswith("[") else host.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def api_base(host: str, *, plain_http: bool | None = None) -> str:
    """The URL the registry API of ``host`` is served under, ``/v2/`` left out.

    ``plain_http`` None means plain HTTP for loopback hosts only, as dockerd does.
    """
    plain = is_loopback(host) if plain_http is None else plain_http
    return f"{'http' if plain else 'https'}://{_API_HOSTS.get(host, host)}"


def digest_of(content: bytes, algorithm: str = "sha256") -> str:
    """``algorithm:hex`` of ``content``."""
    return f"{algorithm}:{_HASHES[algorithm](content).hexdigest()}"


class RegistryClient(Closing):
    """One registry's API, as ``credentials`` (whose ``registry`` is the host) allow.

    ``timeout`` bounds each request's connection and each wait for data, in seconds;
    ``environ`` is where `docker login`'s config is found when no user is set. Close it,
    or use it as a context manager.
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        environ: Mapping[str, str],
        timeout: float,
        plain_http: bool | None = None,
    ) -> None:
        self.host = credentials.registry
        self.base = api_base(self.host, plain_http=plain_http)
        self.timeout = timeout
        self._given = credentials
        self._environ = environ
        self._login: Credentials | None = None
        self._basic = ""
        self._tokens: dict[str, str] = {}  # by scope
        self._session = requests.Session()

    def close(self) -> None:
        """Release the client's connections."""
        self._session.close()

    # --- manifests -----------------------------------------------------------------------

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        """The manifest a tag or digest names (any of MANIFEST_TYPES); TagNotFound if none."""
        call = _Call("get manifest", repository, reference)
        response = self._request(
            "GET", self._url(repository, "manifests", reference), call, ok=(200,),
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        media_type = response.headers.get("Content-Type", "").partition(";")[0].strip()
        stated = response.headers.get("Docker-Content-Digest", "")
        digest = self._verified(response.content, call, [reference, stated])
        return Manifest(response.content, media_type, digest)

    def manifest_digest(self, repository: str, reference: str) -> str | None:
        """The digest of the manifest a tag or digest names; None when there is none."""
        call = _Call("look up manifest", repository, reference)
        response = self._request(
            "HEAD", self._url(repository, "manifests", reference), call, ok=(200, 404),
            headers={"Accept": ", ".join(MANIFEST_TYPES)},
        )
        if response.status_code == 404:
            return None
        # Registries should say it on HEAD; one that does not is asked for the content.
        stated = response.headers.get("Docker-Content-Digest")
        return stated or self.get_manifest(repository, reference).digest

    def put_manifest(
        self, repository: str, reference: str, content: bytes, media_type: str
    ) -> str:
        """Store ``content`` under a tag (or its digest); return the digest the registry gives.

        Every blob it refers to must be in the repository already.
        """
        call = _Call("put manifest", repository, reference)
        response = self._request(
            "PUT", self._url(repository, "manifests", reference), call, ok=(201,),
            headers={"Content-Type": media_type}, data=content,
        )
        stated = response.headers.get("Docker-Content-Digest", "")
        self._verified(content, call, [stated])
        return stated or digest_of(content)

    def delete_manifest(self, repository: str, digest: str) -> None:
        """Delete the manifest ``digest`` (and so every tag naming it)."""
        call = _Call("delete manifest", repository, digest)
        self._request("DELETE", self._url(repository, "manifests", digest), call, ok=(200, 202))

    def tags(self, repository: str, *, page_size: int | None = None) -> list[str]:
        """Every tag of ``repository``, following the registry's ``Link`` pages.

        ``page_size`` asks for pages of that many tags (``n=``); registries may ignore it.
        """
        call = _Call("list tags", repository, "")
        url: str | None = f"{self.base}/v2/{repository}/tags/list"
        params = {"n": str(page_size)} if page_size else None
        found: list[str] = []
        while url:
            response = self._request("GET", url, call, ok=(200,), params=params)
            found.extend(response.json().get("tags") or [])
            following = response.links.get("next", {}).get("url")
            # The next page's URL carries its own parameters.
            url, params = (urljoin(response.url, following) if following else None), None
        return found

    # --- blobs ---------------------------------------------------------------------------

    def get_blob(self, repository: str, digest: str) -> bytes:
        """A blob's content, checked against ``digest``."""
        call = _Call("get blob", repository, digest)
        response = self._request("GET", self._url(repository, "blobs", digest), call, ok=(200,))
        self._verified(response.content, call, [digest])
        return response.content

    def blob_exists(self, repository: str, digest: str) -> bool:
        """Whether ``repository`` holds the blob ``digest``."""
        call = _Call("look up blob", repository, digest)
        response = self._request(
            "HEAD", self._url(repository, "blobs", digest), call, ok=(200, 404)
        )
        return response.status_code == 200

    def upload_blob(self, repository: str, content: bytes) -> str:
        """Upload ``content`` unless the repository has it (one monolithic PUT); its digest."""
        digest = digest_of(content)
        if self.blob_exists(repository, digest):
            return digest
        call = _Call("upload blob", repository, digest)
        started = self._request(
            "POST", f"{self.base}/v2/{repository}/blobs/uploads/", call, ok=(202,)
        )
        location = started.headers.get("Location")
        if not location:
            raise RegistryAPIError(
                f"{call.action} {self._name(call)} failed: the registry gave no upload location",
                host=self.host, repository=repository, reference=digest, status=202,
            )
        finished = self._request(
            "PUT", urljoin(started.url, location), call, ok=(201,),
            params={"digest": digest}, data=content,
            headers={"Content-Type": "application/octet-stream"},
        )
        self._verified(content, call, [finished.headers.get("Docker-Content-Digest", "")])
        return digest

    # --- requests and their answers -----------------------------------------------------

    def _url(self, repository: str, kind: str, reference: str) -> str:
        return f"{self.base}/v2/{repository}/{kind}/{reference}"

    def _name(self, call: _Call) -> str:
        return reference_name(self.host, call.repository, call.reference)

    def _request(
        self, method: str, url: str, call: _Call, *, ok: Collection[int], **kwargs: Any
    ) -> requests.Response:
        """Send a request, answering one 401 challenge; raise unless its status is ``ok``."""
        scope = f"repository:{call.repository}:{_ACTIONS.get(method, 'delete')}"
        response = self._send(method, url, call, scope, **kwargs)
        if response.status_code == 401:
            self._authenticate(response.headers.get("WWW-Authenticate", ""), scope, call)
            response = self._send(method, url, call, scope, **kwargs)
        if response.status_code not in ok:
            raise self._refused(method, response, call)
        return response

    def _send(
        self,
        method: str,
        url: str,
        call: _Call,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        sent = dict(headers or {})
        token = self._tokens.get(scope)
        authorization = f"Bearer {token}" if token else self._basic
        # Only to the registry: an upload location may be another host's.
        if authorization and urlsplit(url).netloc == urlsplit(self.base).netloc:
            sent["Authorization"] = authorization
        try:
            return self._session.request(
                method, url, headers=sent, timeout=self.timeout, **kwargs
            )
        except requests.RequestException as error:
            raise self._unreachable(error, call, self.host) from None

    def _authenticate(self, challenge: str, scope: str, call: _Call) -> None:
        """Answer the registry's ``WWW-Authenticate``: remember a Basic header or a token."""
        scheme, _, rest = challenge.strip().partition(" ")
        params = {key: quoted or bare for key, quoted, bare in _CHALLENGE_PARAM.findall(rest)}
        login = self._credentials()
        if scheme.lower() == "basic" and login.user:
            pair = f"{login.user}:{login.password}".encode()
            self._basic = f"Basic {base64.b64encode(pair).decode()}"
        elif scheme.lower() == "basic":
            raise self._auth_error(call, "401 Unauthorized: the registry asks for a login")
        elif scheme.lower() == "bearer" and params.get("realm"):
            self._tokens[scope] = self._token(params, scope, login, call)
        else:
            raise RegistryAPIError(
                f"{call.action} {self._name(call)} failed: 401 Unauthorized with a challenge "
                f"layerkeep cannot answer ({scheme or 'none'})",
                host=self.host, repository=call.repository, reference=call.reference,
                status=401,
            )

    def _token(
        self, params: Mapping[str, str], scope: str, login: Credentials, call: _Call
    ) -> str:
        """A token from the challenge's realm for its service and scope (ours if it has none)."""
        realm = params["realm"]
        asked = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        try:
            response = self._session.get(
                realm,
                params={key: value for key, value in asked.items() if value},
                auth=(login.user, login.password) if login.user else None,
                timeout=self.timeout,
            )
        except requests.RequestException as error:
            raise self._unreachable(error, call, f"the token server {realm}") from None
        if response.status_code in (401, 403):
            said = registry_says(response)
            raise self._auth_error(call, f"the token server {realm} answered {said}")
        if response.status_code != 200:
            raise self._refused("GET", response, call)
        try:
            answer = response.json()
            token = answer.get("token") or answer.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryAPIError(
                f"{call.action} {self._name(call)} failed: the token server {realm} "
                "answered no token",
                host=self.host, repository=call.repository, reference=call.reference,
                status=response.status_code,
            )
        return token

    def _credentials(self) -> Credentials:
        """Our login: the given user, else what `docker login` stored for the host, if any."""
        if self._login is None:
            found = None if self._given.user else docker_login(self.host, self._environ)
            self._login = Credentials(self.host, *found) if found else self._given
        return self._login

    def _mask(self, text: str) -> str:
        login = self._login or self._given
        secrets = [self._given.password, login.password, *self._tokens.values()]
        return Masker.of(secrets, logins=[(login.user, login.password)]).mask(text)

    def _auth_error(self, call: _Call, text: str) -> RegistryAuthError:
        login = self._login or self._given
        if self._given.user:
            who = f"user {self._given.user}"
            hint = "check LAYERKEEP_REGISTRY_USER and LAYERKEEP_REGISTRY_PASSWORD"
        elif login.user:
            who = f"user {login.user} of `docker login`"
            hint = f"log in again (`docker login {self.host}`), or set LAYERKEEP_REGISTRY_USER"
        else:
            who = "no login: none set, none in the docker config"
            hint = (
                f"run `docker login {self.host}` on this machine, or set "
                "LAYERKEEP_REGISTRY_USER and LAYERKEEP_REGISTRY_PASSWORD"
            )
        needed = call.action.split()[0]
        access = {"upload": "push", "put": "push", "delete": "delete"}.get(needed, "pull")
        return RegistryAuthError(
            self._mask(
                f"authentication failed for {self.host} ({who}) on {call.action} "
                f"{self._name(call)}: {text}"
            ),
            image=self._name(call),
            hint=f"{hint}; it needs {access} access to {call.repository}",
            status=401,
        )

    def _refused(
        self, method: str, response: requests.Response, call: _Call
    ) -> DockerOperationError:
        """The error for a status we did not expect."""
        status = response.status_code
        said = self._mask(registry_says(response))
        message = self._mask(f"{call.action} {self._name(call)} failed: {said}")
        where = {"host": self.host, "repository": call.repository, "reference": call.reference}
        if status in (401, 403):
            return self._auth_error(call, said)
        if status == 404 and method in ("GET", "DELETE") and "manifest" in call.action:
            return TagNotFound(message, image=self._name(call), status=404)
        if status == 405 and method == "DELETE":
            return DeleteDisabled(
                message, **where, status=status,
                hint="the registry does not allow deletes: enable them in its configuration "
                "(Docker Distribution, registry:2: storage.delete.enabled: true, or "
                "REGISTRY_STORAGE_DELETE_ENABLED=true); hosted registries may allow none",
            )
        if status >= 500 or status == 429:
            unavailable = RegistryUnavailable(
                message, image=self._name(call), attempts=1,
                hint=f"is {self.host} up? a registry that is failing may recover",
            )
            unavailable.status = status
            return unavailable
        return RegistryAPIError(message, **where, status=status)

    def _unreachable(
        self, error: requests.RequestException, call: _Call, where: str
    ) -> RegistryUnavailable:
        """The error for a request that got no answer: why, in a few words."""
        if isinstance(error, requests.Timeout):
            reason = f"no answer within {self.timeout:g} s (timed out)"
        else:
            reason = root_reason(error)
        hint = f"is {self.host} up and reachable from this machine?"
        if isinstance(error, requests.exceptions.SSLError):
            hint = (
                "the TLS handshake failed: does it serve HTTPS with a certificate this "
                "machine trusts? (REQUESTS_CA_BUNDLE names a private CA)"
            )
        return RegistryUnavailable(
            self._mask(f"{call.action} {self._name(call)} failed: {where}: {reason}"),
            image=self._name(call), attempts=1, hint=hint,
        )

    def _verified(self, content: bytes, call: _Call, stated: Collection[str]) -> str:
        """The digest of ``content``; DigestMismatch unless it is every digest ``stated``.

        Stated values that are not digests (a tag, an empty header) are skipped.
        """
        digests = [value for value in stated if _algorithm(value) in _HASHES]
        for digest in digests:
            actual = digest_of(content, _algorithm(digest))
            if actual != digest:
                raise DigestMismatch(
                    f"{call.action} {self._name(call)} failed: the content's digest is "
                    f"{actual}, not {digest}",
                    host=self.host, repository=call.repository, reference=call.reference,
                    status=None,
                    hint="the registry's storage may be damaged; push the content again",
                )
        return digests[0] if digests else digest_of(content)


def _algorithm(digest: str) -> str:
    """``sha256`` of ``sha256:...``; empty for what is not a digest (a tag)."""
    algorithm, colon, _ = digest.partition(":")
    return algorithm if colon else ""
