"""test.run: the project's tests inside the app image, JUnit XML into the reports folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerkeep.core.engine import Engine
from layerkeep.core.settings import Mount, Settings
from layerkeep.testing.app_container import REPORTS_MOUNT, mounts_for, run_in_app_image

Log = Callable[[str], None]


@dataclass(frozen=True)
class TestResult:
    """How the tests ended and which reports they wrote."""

    exit_code: int
    seconds: float
    reports: tuple[Path, ...]

    @property
    def passed(self) -> bool:
        """The test command exited 0."""
        return self.exit_code == 0


def test_script(settings: Settings) -> str:
    """The setup commands (if any), then the test command, stopping at the first failure."""
    if not settings.test_setup:
        return settings.test_command
    return f"set -e\n{settings.test_setup}\n{settings.test_command}"


def run_tests(engine: Engine, settings: Settings, *, log: Log = print) -> TestResult:
    """Run LAYERKEEP_TEST_COMMAND in the app image against the job's services."""
    reports = settings.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    # Images often run as a non-root user whose uid the host does not know: let it
    # write its reports.
    reports.chmod(0o777)
    before = {path: path.stat().st_mtime_ns for path in reports.rglob("*.xml")}
    started = time.monotonic()
    log(f"running tests in {settings.require_image()}: {settings.test_command}")
    exit_code = run_in_app_image(
        engine,
        settings,
        test_script(settings),
        purpose="tests",
        mounts=mounts_for(settings, Mount(reports.resolve(), REPORTS_MOUNT)),
        log=log,
    )
    written = tuple(
        sorted(p for p in reports.rglob("*.xml") if before.get(p) != p.stat().st_mtime_ns)
    )
    seconds = time.monotonic() - started
    verdict = "passed" if exit_code == 0 else f"failed (exit {exit_code})"
    log(f"tests {verdict} in {seconds:.1f} s; {len(written)} report(s) in {reports}")
    return TestResult(exit_code, seconds, written)
