"""Session setup: a running engine with the official images, and cleanup by label."""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from engine_setup import ensure_engine, ensure_images, sweep

from layerkeep.core.engine import Engine, connect

TEST_LABEL = ("io.layerkeep.test", "1")
# Each test session marks what it creates with its own id, and removes only that: two
# suites may share one engine (and a user's own runs are never touched).
SESSION = uuid.uuid4().hex[:8]
SESSION_LABEL = ("io.layerkeep.test-session", SESSION)
TEST_REPOSITORY = f"layerkeep-test/{SESSION}"
# Leftovers of a killed session are swept once they are this old (seconds).
STALE_AFTER = 6 * 3600
SETUP_LOCK = Path(tempfile.gettempdir()) / "layerkeep-test-setup.lock"
# Set by git for hooks: a suite run from one must not work on the user's repository.
GIT_LOCATORS = (
    "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_COMMON_DIR",
)


def pytest_configure(config: pytest.Config) -> None:
    """git in the tests (and in the `inv` runs they start) reads no user or system
    config, as on a fresh CI machine: a contributor's commit signing, hooks or templates
    would break the commits the tests make."""
    os.environ["GIT_CONFIG_GLOBAL"] = os.devnull
    os.environ["GIT_CONFIG_NOSYSTEM"] = "1"
    for name in GIT_LOCATORS:
        os.environ.pop(name, None)


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The real engine (started when missing), with every official image the tests use
    (pulled, else a stand-in)."""
    # pytest-xdist workers (and suites run side by side, by any user) start, pull or build
    # these once.
    lock = open_setup_lock(SETUP_LOCK)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_engine(os.environ)
        connected = connect(os.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
        ensure_images(connected)
    finally:
        os.close(lock)
    sweep(connected, *TEST_LABEL, older_than=STALE_AFTER)
    yield connected
    sweep(connected, *SESSION_LABEL)
    remove_test_images(connected)


def open_setup_lock(path: Path) -> int:
    """A descriptor of ``path`` to flock, made when missing; never through a symlink.

    Read-only, and without O_CREAT when it exists: the file may be another user's, and
    in a sticky /tmp (fs.protected_regular) even root may not O_CREAT-open that.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        return os.open(path, flags | os.O_CREAT, 0o644)


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
