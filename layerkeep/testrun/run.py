"""test.run: the project's tests inside the app image, JUnit XML into the reports folder.

The reports folder may hold the user's own files, so only what layerkeep's previous run
wrote there is removed before the tests: each run lists the files it wrote in
``.layerkeep-reports.json`` in that folder. A run whose tests fail before writing JUnit
then leaves no stale ``junit.xml`` behind for CI to show.

The container never writes the reports folder itself, whose permissions stay as they
are: images often run as a user the host does not know, so the tests get a folder of
their own to write (mode 0777, inside a 0700 folder of layerkeep's in the reports
folder, so no other user on the host can reach it), and what they wrote is moved into
the reports folder afterwards (copied, where the container made a folder as its own
user that we may not move out of). Only regular files come out: a link the tests left
would point into the host.

Setup and tests are timed apart: the script echoes a marker between the setup commands
and the test command, and its arrival in the streamed output ends the setup time (the
container's start included).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import stat
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from layerkeep.core.atomic import atomic_write
from layerkeep.core.engine import Engine
from layerkeep.core.settings import Mount, Settings
from layerkeep.testrun.app_container import REPORTS_MOUNT, mounts_for, run_in_app_image

Log = Callable[[str], None]
MANIFEST = ".layerkeep-reports.json"
SETUP_DONE = "==> layerkeep: setup done, the tests start"
# The private folder the test container's own folder lives in while the tests run.
OUTBOX_PREFIX = ".layerkeep-tests-"


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
    removed = clear_previous_reports(reports)
    if removed:
        log(f"removed {removed} file(s) the previous run wrote in {reports}")
    started = time.monotonic()
    setup_done: list[float] = []

    def on_line(line: str) -> None:
        if line == SETUP_DONE and not setup_done:
            setup_done.append(time.monotonic())
            log(f"setup done in {setup_done[0] - started:.1f} s; the tests start")
        else:
            log(line)

    log(f"running tests in {settings.require_image()}: {settings.test_command}")
    with container_outbox(reports, log) as outbox:
        exit_code = run_in_app_image(
            engine,
            settings,
            test_script(settings),
            purpose="tests",
            mounts=mounts_for(settings, Mount(outbox, REPORTS_MOUNT)),
            log=on_line,
        )
        ended = time.monotonic()
        written = move_reports(outbox, reports, log)
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
    text = json.dumps({"written_by": "layerkeep test.run", "files": names}, indent=2) + "\n"
    target = folder / MANIFEST
    atomic_write(target, text.encode(), mode=0o644)
    return target


@contextlib.contextmanager
def container_outbox(reports: Path, log: Log) -> Iterator[Path]:
    """A folder the test container may write (0777), inside a private one (0700) of
    layerkeep's in ``reports``; removed afterwards with what is left in it."""
    private = Path(tempfile.mkdtemp(prefix=OUTBOX_PREFIX, dir=reports)).resolve()
    try:
        outbox = private / "reports"
        outbox.mkdir()
        outbox.chmod(0o777)  # ours, and only reachable through its private parent
        yield outbox
    finally:
        try:
            shutil.rmtree(private)
        except OSError as error:
            log(
                f"warning: could not remove {private} ({error.strerror or error}): the tests "
                "made folders there as another user; remove it as root"
            )


def move_reports(outbox: Path, reports: Path, log: Log) -> list[Path]:
    """Move the regular files the tests wrote in ``outbox`` to the same place in
    ``reports``; the files moved, sorted. What cannot be moved is a warning."""
    moved: list[Path] = []

    def unreadable(error: OSError) -> None:
        log(f"warning: reports in {error.filename} not read: {error.strerror or error}")

    for folder, _, names in os.walk(outbox, onerror=unreadable):
        for name in names:
            source = Path(folder) / name
            target = reports / source.relative_to(outbox)
            if not stat.S_ISREG(source.lstat().st_mode):
                log(f"warning: {target.relative_to(reports)} is not a regular file; left out")
                continue
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                _move(source, target)
            except OSError as error:
                log(f"warning: report {target} not written: {error.strerror or error}")
                continue
            moved.append(target)
    return sorted(moved)


def _move(source: Path, target: Path) -> None:
    try:
        source.replace(target)
    except PermissionError:
        # In a folder the container made as its own user: readable, not ours to empty.
        shutil.copyfile(source, target)
