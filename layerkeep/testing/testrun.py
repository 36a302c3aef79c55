"""test.run: the project's tests inside the app image, JUnit XML into the reports folder.

The reports folder may hold the user's own files, so only what layerkeep's previous run
wrote there is removed before the tests: each run lists the files it wrote in
``.layerkeep-reports.json`` in that folder. A run whose tests fail before writing JUnit
then leaves no stale ``junit.xml`` behind for CI to show.

Setup and tests are timed apart: the script echoes a marker between the setup commands
and the test command, and its arrival in the streamed output ends the setup time (the
container's start included).
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from layerkeep.core.engine import Engine
from layerkeep.core.settings import Mount, Settings
from layerkeep.testing.app_container import REPORTS_MOUNT, mounts_for, run_in_app_image

Log = Callable[[str], None]
MANIFEST = ".layerkeep-reports.json"
SETUP_DONE = "==> layerkeep: setup done, the tests start"


@dataclass(frozen=True)
class CaseCounts:
    """Test cases by outcome, from the JUnit files a run wrote."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    unreadable: tuple[Path, ...] = ()

    @property
    def total(self) -> int:
        """Every test case counted."""
        return self.passed + self.failed + self.skipped + self.errors

    def describe(self) -> str:
        """``12 passed, 1 failed, 2 skipped``: the outcomes that occurred."""
        parts = [
            f"{count} {name}"
            for count, name in (
                (self.passed, "passed"),
                (self.failed, "failed"),
                (self.errors, "errors"),
                (self.skipped, "skipped"),
            )
            if count
        ]
        parts += [f"{path.name} unreadable" for path in self.unreadable]
        return ", ".join(parts) or "no test cases"


@dataclass(frozen=True)
class TestResult:
    """How the tests ended, which JUnit reports they wrote, and where the time went.

    ``test_seconds`` is None when the tests never started (the setup failed).
    """

    exit_code: int
    seconds: float
    reports: tuple[Path, ...]
    counts: CaseCounts = field(default_factory=CaseCounts)
    setup_seconds: float = 0.0
    test_seconds: float | None = None

    @property
    def passed(self) -> bool:
        """The test command exited 0."""
        return self.exit_code == 0

    def note(self) -> str:
        """One line for the summary: the counts, then setup and test time."""
        if self.test_seconds is None:
            return f"setup failed after {self.setup_seconds:.1f} s, no tests ran"
        counts = self.counts.describe() if self.reports else "no JUnit report written"
        return f"{counts}; setup {self.setup_seconds:.1f} s, tests {self.test_seconds:.1f} s"


def test_script(settings: Settings) -> str:
    """The setup commands (if any), the marker, then the test command; stop at a failure."""
    marker = f"echo {shlex.quote(SETUP_DONE)}"
    if not settings.test_setup:
        return f"{marker}\n{settings.test_command}"
    return f"set -e\n{settings.test_setup}\n{marker}\n{settings.test_command}"


def run_tests(engine: Engine, settings: Settings, *, log: Log = print) -> TestResult:
    """Run LAYERKEEP_TEST_COMMAND in the app image against the job's services."""
    reports = settings.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    # Images often run as a non-root user whose uid the host does not know: let it
    # write its reports.
    reports.chmod(0o777)
    removed = clear_previous_reports(reports)
    if removed:
        log(f"removed {removed} file(s) the previous run wrote in {reports}")
    before = _snapshot(reports)
    started = time.monotonic()
    setup_done: list[float] = []

    def on_line(line: str) -> None:
        if line == SETUP_DONE and not setup_done:
            setup_done.append(time.monotonic())
            log(f"setup done in {setup_done[0] - started:.1f} s; the tests start")
        else:
            log(line)

    log(f"running tests in {settings.require_image()}: {settings.test_command}")
    exit_code = run_in_app_image(
        engine,
        settings,
        test_script(settings),
        purpose="tests",
        mounts=mounts_for(settings, Mount(reports.resolve(), REPORTS_MOUNT)),
        log=on_line,
    )
    ended = time.monotonic()
    after = _snapshot(reports)
    written = sorted(path for path, stamp in after.items() if before.get(path) != stamp)
    record_reports(reports, written)
    xml = tuple(path for path in written if path.suffix == ".xml")
    setup = (setup_done[0] if setup_done else ended) - started
    result = TestResult(
        exit_code,
        ended - started,
        xml,
        count_testcases(xml),
        setup,
        ended - setup_done[0] if setup_done else None,
    )
    verdict = "passed" if exit_code == 0 else f"failed (exit {exit_code})"
    log(f"tests {verdict} in {result.seconds:.1f} s: {result.note()}; "
        f"{len(xml)} report(s) in {reports}")
    return result


def count_testcases(reports: Iterable[Path]) -> CaseCounts:
    """Count the ``<testcase>`` outcomes of JUnit XML files (pytest, Django, JUnit 4/5)."""
    tally = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    unreadable: list[Path] = []
    for report in reports:
        try:
            # The project's own test run wrote it on this machine: not untrusted input.
            root = ET.parse(report).getroot()  # noqa: S314
        except (ET.ParseError, OSError):
            unreadable.append(report)
            continue
        for case in root.iter("testcase"):
            if case.find("failure") is not None:
                tally["failed"] += 1
            elif case.find("error") is not None:
                tally["errors"] += 1
            elif case.find("skipped") is not None:
                tally["skipped"] += 1
            else:
                tally["passed"] += 1
    return CaseCounts(**tally, unreadable=tuple(unreadable))


def clear_previous_reports(folder: Path) -> int:
    """Remove the files the manifest says layerkeep's previous run wrote; how many.

    Nothing else is touched: not the user's files, not a path outside ``folder``.
    """
    manifest = folder / MANIFEST
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, AttributeError):
        listed = []  # damaged: ours, so it goes, but it names nothing to remove
    inside = folder.resolve()
    removed = 0
    for name in listed if isinstance(listed, list) else []:
        if not isinstance(name, str):
            continue
        path = folder / name
        if not path.resolve().is_relative_to(inside) or not path.is_file():
            continue
        path.unlink()
        removed += 1
    manifest.unlink()
    return removed


def record_reports(folder: Path, written: Iterable[Path]) -> Path:
    """Write the manifest of the files this run wrote in ``folder`` (atomically)."""
    names = sorted(path.relative_to(folder).as_posix() for path in written)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f"{MANIFEST}.")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        json.dump({"written_by": "layerkeep test.run", "files": names}, stream, indent=2)
        stream.write("\n")
    target = folder / MANIFEST
    Path(temporary).replace(target)
    return target


def _snapshot(folder: Path) -> dict[Path, tuple[int, int]]:
    """Each file under ``folder`` (but the manifest) with its mtime and size."""
    found: dict[Path, tuple[int, int]] = {}
    for path in folder.rglob("*"):
        if path.name.startswith(MANIFEST) or not path.is_file():
            continue
        stat = path.stat()
        found[path] = (stat.st_mtime_ns, stat.st_size)
    return found
