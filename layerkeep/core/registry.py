"""Push and pull of one tag with retries, and the digests a tag has here and in a registry.

Who we are at a registry is :mod:`layerkeep.core.registry_credentials`; how failures are
sorted and retried (``Retries``, LAYERKEEP_PUSH_RETRIES and LAYERKEEP_PUSH_TIMEOUT) is
:mod:`layerkeep.core.registry_failures`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.imageref import ImageRef
from layerkeep.core.log import Log
from layerkeep.core.progress import Meter, MeterFactory, silent
from layerkeep.core.registry_credentials import Credentials
from layerkeep.core.registry_failures import Retries, TagNotFound

_RETRYING = re.compile(r"^Retrying in (\d+) seconds?$")
# The status line that ends a push; Docker 26's containerd image store gives the digest
# only here (the classic store also sends it as an ``aux`` record).
_PUSHED_DIGEST = re.compile(r": digest: (sha256:[0-9a-f]{64}) size: \d+$")


Record = Mapping[str, Any]
R = TypeVar("R")


class _Transfer(Protocol):
    """``Engine.push`` or ``Engine.pull``: one attempt's progress records."""

    def __call__(
        self, reference: str, *, auth: Mapping[str, str] | None = None,
        deadline: float | None = None,
    ) -> Iterator[Record]: ...


@dataclass(frozen=True)
class Pushed:
    """One tag pushed: the manifest digest the registry stored, and what it took."""

    reference: str
    digest: str
    seconds: float
    attempts: int
    layers_pushed: int
    bytes_pushed: int


@dataclass(frozen=True)
class Pulled:
    """One tag pulled: its digest, whether anything new came down, and what it took."""

    reference: str
    digest: str
    downloaded: bool
    seconds: float
    attempts: int
    bytes_downloaded: int



def push_tag(
    engine: Engine, reference: ImageRef, credentials: Credentials, retries: Retries,
    *, progress: MeterFactory = silent,
) -> Pushed:
    """Push one local tag; return the digest its stream reports (``aux`` or status line).

    ``retries`` bounds the whole push; ``progress`` shows the bytes sent.
    """
    (digest, layers, size), tries, seconds = _transfer(
        "push", engine.push, reference, credentials, retries, progress=progress,
        read=lambda records: _read_push(str(reference), records),
    )
    return Pushed(str(reference), digest, seconds, tries, layers, size)


def pull_tag(
    engine: Engine, reference: ImageRef, credentials: Credentials, retries: Retries,
    *, progress: MeterFactory = silent,
) -> Pulled:
    """Pull one tag; a tag the registry lacks raises TagNotFound.

    ``retries`` bounds the whole pull; ``progress`` shows the bytes received.
    """
    (digest, downloaded, size), tries, seconds = _transfer(
        "pull", engine.pull, reference, credentials, retries, progress=progress, read=_read_pull
    )
    return Pulled(str(reference), digest, downloaded, seconds, tries, size)


def _transfer(
    action: str,
    transfer: _Transfer,
    reference: ImageRef,
    credentials: Credentials,
    retries: Retries,
    *,
    progress: MeterFactory,
    read: Callable[[Iterator[Record]], R],
) -> tuple[R, int, float]:
    """Push or pull one tag: what ``read`` makes of the last attempt's progress records,
    the attempts, and the seconds it all took."""
    started = time.monotonic()
    engine_retries = _EngineRetries(action, str(reference), retries.attempts, retries.log)

    def once(deadline: float | None) -> R:
        engine_retries.next_attempt()
        meter = TransferProgress(progress(f"{action} {reference}", None, "B"))

        def records() -> Iterator[Record]:
            for chunk in transfer(
                str(reference), auth=credentials.auth_config(), deadline=deadline
            ):
                meter.note(chunk)
                engine_retries.note(str(chunk.get("status", "")))
                yield chunk

        result = read(records())
        meter.close()
        return result

    result, tries = retries.run(
        once, action=action, reference=str(reference), credentials=credentials
    )
    return result, tries, time.monotonic() - started


def _read_push(reference: str, records: Iterator[Record]) -> tuple[str, int, int]:
    """The pushed manifest's digest, the layers pushed and their bytes."""
    digest = ""
    totals: dict[str, int] = {}
    pushed: set[str] = set()
    for chunk in records:
        aux = chunk.get("aux")
        if isinstance(aux, dict) and aux.get("Digest"):
            digest = str(aux["Digest"])
        layer, status = str(chunk.get("id", "")), str(chunk.get("status", ""))
        stated = _PUSHED_DIGEST.search(status)
        if stated and not digest:
            digest = stated[1]
        total = (chunk.get("progressDetail") or {}).get("total")
        if layer and isinstance(total, int):
            totals[layer] = max(total, totals.get(layer, 0))
        if layer and status == "Pushed":
            pushed.add(layer)
    if not digest:
        raise DockerOperationError(f"push {reference} ended without a digest", image=reference)
    return digest, len(pushed), sum(totals.get(layer, 0) for layer in pushed)


def _read_pull(records: Iterator[Record]) -> tuple[str, bool, int]:
    """The pulled manifest's digest, whether anything new came down, and its bytes."""
    digest, downloaded = "", False
    totals: dict[str, int] = {}
    for chunk in records:
        status = str(chunk.get("status", ""))
        if status.startswith("Digest: "):
            digest = status.removeprefix("Digest: ").strip()
        elif status.startswith("Status: Downloaded newer image"):
            downloaded = True
        total = (chunk.get("progressDetail") or {}).get("total")
        if status == "Downloading" and isinstance(total, int):
            layer = str(chunk.get("id", ""))
            totals[layer] = max(total, totals.get(layer, 0))
    return digest, downloaded, sum(totals.values())


class TransferProgress:
    """Bytes moved by a push or pull, from the engine's per-layer progress records."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.layers: dict[str, int] = {}

    def note(self, chunk: Mapping[str, Any]) -> None:
        """Advance the meter by what this record says a layer moved since the last."""
        current = (chunk.get("progressDetail") or {}).get("current")
        layer = str(chunk.get("id", ""))
        if not layer or not isinstance(current, int):
            return
        moved = current - self.layers.get(layer, 0)
        if moved > 0:
            self.layers[layer] = current
            self.meter.advance(moved)

    def close(self) -> None:
        """The transfer ended."""
        self.meter.close()



def remote_digest(
    engine: Engine, reference: ImageRef, credentials: Credentials, retries: Retries
) -> str | None:
    """The manifest digest ``reference`` resolves to in its registry; None when absent."""

    def once(deadline: float | None) -> str:
        return engine.registry_digest(
            str(reference), auth=credentials.auth_config(), deadline=deadline
        )

    try:
        digest, _ = retries.run(
            once, action="look up", reference=str(reference), credentials=credentials
        )
    except TagNotFound:
        return None
    return digest


class _EngineRetries:
    """Says in one line per attempt that the engine retries a transfer itself.

    The engine retries a failed layer upload or download 5 times (waits of 5, 10, 15
    and 20 s) before it reports the error, and counts each wait down once a second;
    without a word the job looks hung, and with every record it floods the log.
    """

    def __init__(self, action: str, reference: str, attempts: int, log: Log) -> None:
        self.action, self.reference, self._attempts, self._log = (
            action, reference, attempts, log,
        )
        self._attempt = 0
        self._said = False

    def next_attempt(self) -> None:
        """A new attempt of ours begins."""
        self._attempt += 1
        self._said = False

    def note(self, status: str) -> None:
        """Look at one progress record's status."""
        if self._said or not _RETRYING.match(status):
            return
        self._said = True
        self._log(
            f"{self.action} {self.reference}: attempt {self._attempt}/{self._attempts}: the "
            f"registry failed a layer {'upload' if self.action == 'push' else 'download'}; "
            "the engine retries it itself (5 tries, about 50 s)"
        )


def local_digests(engine: Engine, reference: str) -> Iterable[str]:
    """The ``repository@digest`` names the engine records for a local image."""
    attrs: Mapping[str, Any] | None = engine.image_attrs(reference)
    return tuple(str(name) for name in (attrs or {}).get("RepoDigests") or ())
