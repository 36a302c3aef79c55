"""The registry API client's errors, and how a refusal or a lost connection is put in
one line: the registry's own first error, or the operating system's words.
"""

from __future__ import annotations

import json

import requests

from layerkeep.core.errors import DockerOperationError

_MESSAGE_MAX = 300


class RegistryAPIError(DockerOperationError):
    """The registry refused a request: where (host, repository, reference) and its status."""

    def __init__(
        self,
        message: str,
        *,
        host: str,
        repository: str,
        reference: str,
        status: int | None,
        hint: str = "",
    ) -> None:
        image = reference_name(host, repository, reference)
        super().__init__(message, image=image, hint=hint, status=status)
        self.host = host
        self.repository = repository
        self.reference = reference


class DeleteDisabled(RegistryAPIError):
    """The registry does not allow deletes (Docker Distribution: storage.delete.enabled)."""


class DigestMismatch(RegistryAPIError):
    """What the registry sent or stored does not match its digest."""


def reference_name(host: str, repository: str, reference: str) -> str:
    """``host/repository:tag`` or ``host/repository@digest`` (no reference: the repository)."""
    if not reference:
        return f"{host}/{repository}"
    return f"{host}/{repository}{'@' if ':' in reference else ':'}{reference}"


def registry_says(response: requests.Response) -> str:
    """The status and the registry's first error (``CODE: message``), on one short line."""
    said = ""
    try:
        errors = json.loads(response.content).get("errors") or []
        said = f"{errors[0].get('code', '')}: {errors[0].get('message', '')}"
    except (ValueError, AttributeError, IndexError, TypeError):
        said = response.text
    text = " ".join(f"{response.status_code} {response.reason or ''} {said}".split())
    return text[:_MESSAGE_MAX]


def root_reason(error: BaseException) -> str:
    """The operating system's words under a requests error (``Connection refused``)."""
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return str(current.strerror)
        linked = (getattr(current, "reason", None), current.__cause__, *current.args)
        pending.extend(item for item in linked if isinstance(item, BaseException))
    return " ".join(str(error).split())[:_MESSAGE_MAX]
