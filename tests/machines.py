"""Another machine for a whole job: a throw-away engine holding only what CI would pull.

    with fresh_machine(folder, kind, images=["python:3.11-slim"]) as (engine, environ):
        subprocess.run(["inv", "ci"], env={**environ, ...})

The engine is a second dockerd (``second_engine.py``: Debian's 20.10, or Docker 26 with
buildx on the classic or the containerd image store) that starts empty; ``images`` are
copied in from the session's engine, as a fresh CI machine pulls its base images. Its
builder cache starts empty, so a build that reuses steps there reuses the restored cache
(the shared engine's builder cache is never pruned). Skipped where no second engine can
run (not root).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import SESSION_LABEL, TEST_LABEL
from second_engine import SecondEngineUnavailable, ensure_docker26, second_engine, transfer_images

from layerkeep.core.engine import Engine, connect

__all__ = ["fresh_machine"]


@contextlib.contextmanager
def fresh_machine(
    folder: Path, kind: str = "20.10", *, images: Sequence[str]
) -> Iterator[tuple[Engine, dict[str, str]]]:
    """An empty engine of ``kind`` ("20.10", "26-classic", "26-containerd") with
    ``images``; the engine and the client environment reaching it."""
    try:
        docker26 = ensure_docker26() if kind.startswith("26") else None
        containerd = kind == "26-containerd"
        with second_engine(folder, docker26=docker26, containerd_store=containerd) as second:
            transfer_images(dict(os.environ), second.environ, list(images))
            environ = dict(second.environ)
            connected = connect(environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            try:
                yield connected, environ
            finally:
                connected.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
