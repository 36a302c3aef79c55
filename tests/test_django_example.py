"""`inv ci` on the bundled Django example, with its committed layerkeep.env only.

The example (example-django/) is a small but real Django project: postgres and redis,
a BuildKit cache mount for pip, tests excluded by .dockerignore and mounted for the run,
and the application's own git-ignored .env, which layerkeep does not need. The cold run
is on the session's engine; the restored one on another machine (``machines.py``) that
has only the base image and the cache folder, so its hits can only come from the cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from clean_env import clean_environ
from machines import fresh_machine

from layerkeep.core.engine import Engine
from layerkeep.core.job import BUILD_ID_LABEL
from layerkeep.testrun.reports_folder import MANIFEST
from layerkeep.testrun.run import count_testcases

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
APP_SECRET = "dev-only-" + uuid.uuid4().hex  # the developer's own, in the app's .env


@dataclass
class DjangoProject:
    """A copy of example-django/ as its own git repository."""

    root: Path
    image: str

    def inv(
        self, *args: str, build_id: str, **extra: str
    ) -> tuple[subprocess.CompletedProcess[str], float]:
        # Committed settings only: nothing LAYERKEEP_* or CI's from this process, but the
        # names that keep parallel test runs apart (and ``extra``: another engine).
        environ = clean_environ(LAYERKEEP_IMAGE=self.image, LAYERKEEP_BUILD_ID=build_id, **extra)
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "invoke", *args],
            cwd=self.root,
            env=environ,
            capture_output=True,
            text=True,
            check=False,
            timeout=1200,
        )
        return done, time.monotonic() - started


@pytest.fixture
def django_project(tmp_path: Path, engine: Engine, unique_repository: str) -> DjangoProject:
    root = tmp_path / "notes"
    shutil.copytree(REPO / "example-django", root, ignore=shutil.ignore_patterns("__pycache__"))
    # A developer's private settings: git-ignored, never read by layerkeep's tasks.
    (root / ".env").write_text(
        (root / ".env.example").read_text().replace("change-me", APP_SECRET)
    )
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "notes"], check=True)
    return DjangoProject(root, f"{unique_repository}/notes")


def summary_line(output: str, task: str) -> str:
    table = output.rsplit("\ntask ", 1)[-1]
    return next(line for line in table.splitlines() if line.startswith(f"{task} "))


def test_the_django_example_runs_green_and_restores(
    django_project: DjangoProject, engine: Engine
) -> None:
    root = django_project.root
    tracked = subprocess.run(
        ["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "layerkeep.env" in tracked
    assert ".env" not in tracked
    build_id = f"t{uuid.uuid4().hex[:8]}"

    cold, cold_seconds = django_project.inv("ci", build_id=build_id)

    assert cold.returncode == 0, cold.stdout[-4000:] + cold.stderr
    assert "buildkit" in summary_line(cold.stdout, "image.build")
    reports = sorted((root / "reports").glob("*.xml"))
    counts = count_testcases(reports)
    assert counts.passed >= 10
    assert counts.failed == counts.errors == 0
    assert counts.skipped == 1  # the DEBUG-only test: CI runs with DEBUG off
    test_line = summary_line(cold.stdout, "test.run")
    assert f"{counts.passed} passed, 1 skipped; setup " in test_line
    assert (root / "reports" / MANIFEST).is_file()
    # The CI-only key is masked (its name says SECRET); the developer's .env stays unread.
    assert "ci-only-not-a-real-key" not in cold.stdout + cold.stderr
    assert APP_SECRET not in cold.stdout + cold.stderr
    assert engine.list_containers([f"{BUILD_ID_LABEL}={build_id}"]) == []

    # Another machine: the base image a CI job pulls; postgres and redis come from the
    # cache (LAYERKEEP_CACHE_IMAGES), as everything the build reuses must.
    with fresh_machine(root.parent / "machine", images=["python:3.11-slim"]) as (
        other, environ
    ):
        restored, restored_seconds = django_project.inv("ci", build_id=build_id, **environ)
        assert other.list_containers([f"{BUILD_ID_LABEL}={build_id}"]) == []

    assert restored.returncode == 0, restored.stdout[-4000:] + restored.stderr
    loaded = summary_line(restored.stdout, "cache.load")
    assert loaded.split()[4:6] == ["4", "restored"], loaded  # app, stage, postgres, redis
    build = summary_line(restored.stdout, "image.build").split()
    reused, total = build[4].split("/")
    assert reused == total, build
    assert int(total) >= 8
    print(
        f"django example: cold inv ci {cold_seconds:.1f} s, restored {restored_seconds:.1f} s, "
        f"{reused}/{total} steps reused; {counts.describe()}"
    )
