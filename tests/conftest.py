"""Session setup: a running engine with the stand-in images, and cleanup by label."""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_setup import ensure_engine, sweep

from layerkeep.core.engine import Engine, connect
from layerkeep.standins.images import ensure_standins

TEST_LABEL = ("io.layerkeep.test", "1")
# Each test session marks what it creates with its own id, and removes only that: two
# suites may share one engine (and a user's own runs are never touched).
SESSION = uuid.uuid4().hex[:8]
SESSION_LABEL = ("io.layerkeep.test-session", SESSION)
TEST_REPOSITORY = f"layerkeep-test/{SESSION}"
# Leftovers of a killed session are swept once they are this old (seconds).
STALE_AFTER = 6 * 3600
SETUP_LOCK = Path(tempfile.gettempdir()) / "layerkeep-test-setup.lock"


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The real engine (started when missing), with every stand-in image present."""
    # pytest-xdist workers (and suites run side by side) start or build these once.
    with SETUP_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_engine(os.environ)
        connected = connect(os.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
        ensure_standins(connected)
    sweep(connected, *TEST_LABEL, older_than=STALE_AFTER)
    yield connected
    sweep(connected, *SESSION_LABEL)
    remove_test_images(connected)


def remove_test_images(engine: Engine, repository_prefix: str = TEST_REPOSITORY) -> None:
    """Remove every image whose repository starts with ``repository_prefix``."""
    for image in engine.api.images():
        for tag in image.get("RepoTags") or []:
            if tag.startswith(repository_prefix):
                engine.api.remove_image(tag, force=True)


@pytest.fixture
def unique_repository(engine: Engine) -> Iterator[str]:
    """A repository name no other test uses; its images are removed afterwards."""
    repository = f"{TEST_REPOSITORY}/{uuid.uuid4().hex[:10]}"
    yield repository
    remove_test_images(engine, repository)
