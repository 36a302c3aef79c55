"""test.run: the project's tests inside the app image, JUnit XML into the reports folder.

The reports folder (:mod:`.reports_folder`) may hold the user's own files, so only what
layerkeep's previous run wrote there is removed before the tests: each run lists the
files it wrote in ``.layerkeep-reports.json`` in that folder. A run whose tests fail
before writing JUnit then leaves no stale ``junit.xml`` behind for CI to show.

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

With LAYERKEEP_TEST_FILES the files are split between nodes (:mod:`.split`): a CI
node runs its share, ``--nodes N`` runs N containers at once (:mod:`.nodes`). What a
node's tests write is named by node (``junit.xml`` -> ``junit-node2.xml``), and the
seconds each file took go into the timing history kept with the cache
(:mod:`.timing_store`), which balances the next split.
"""

from __future__ import annotations

import contextlib
import shlex
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerkeep.core.ci_vars import commit_time
from layerkeep.core.engine import Engine
from layerkeep.core.log import Log
from layerkeep.core.settings import Mount, Settings
from layerkeep.testrun.app_container import REPORTS_MOUNT, mounts_for
from layerkeep.testrun.nodes import ContainerRun, node_settings, run_at_once
from layerkeep.testrun.reports_folder import (
    clear_previous_reports,
    container_outbox,
    move_reports,
    record_reports,
)
from layerkeep.testrun.split import PLACEHOLDER, Node, Plan, plan_tests, share_command
from layerkeep.testrun.timing_store import load_history, save_history
from layerkeep.testrun.timings import file_seconds, measured

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

    def __add__(self, other: CaseCounts) -> CaseCounts:
        return CaseCounts(
            self.passed + other.passed,
            self.failed + other.failed,
            self.skipped + other.skipped,
            self.errors + other.errors,
            self.unreadable + other.unreadable,
        )

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
class NodeResult:
    """One node of a split run: its files, how its tests ended, what it wrote.

    ``files`` is empty for a node whose share is empty (it ran nothing and passed).
    """

    node: Node
    files: tuple[str, ...]
    exit_code: int = 0
    reports: tuple[Path, ...] = ()
    counts: CaseCounts = field(default_factory=CaseCounts)
    test_seconds: float | None = None

    def line(self) -> str:
        """``node 2/4: 31 tests, 42.0 s``, or why it ran none."""
        if not self.files:
            return f"{self.node}: no test files in its share, nothing to run"
        if self.test_seconds is None:
            return f"{self.node}: setup failed (exit {self.exit_code})"
        return f"{self.node}: {self.counts.total} tests, {self.test_seconds:.1f} s"

    def figures(self) -> dict[str, object]:
        """The node's part of the JSON report."""
        return {
            "node": self.node.index,
            "of": self.node.total,
            "files": len(self.files),
            "tests": self.counts.total,
            "test_seconds": None if self.test_seconds is None else round(self.test_seconds, 3),
            "exit_code": self.exit_code,
            "reports": [str(path) for path in self.reports],
        }


@dataclass(frozen=True)
class TestResult:
    """How the tests ended, which JUnit reports they wrote, and where the time went.

    ``test_seconds`` is None when the tests never started (the setup failed); with
    several nodes, setup and test times are the slowest node's. ``nodes`` is empty when
    the tests were not split (no LAYERKEEP_TEST_FILES).
    """

    exit_code: int
    seconds: float
    reports: tuple[Path, ...]
    counts: CaseCounts = field(default_factory=CaseCounts)
    setup_seconds: float = 0.0
    test_seconds: float | None = None
    nodes: tuple[NodeResult, ...] = ()
    # What the split was balanced by, and whether this run's timings were kept.
    split: str = ""
    timings_saved: bool = False

    @property
    def passed(self) -> bool:
        """The test command exited 0 (on every node)."""
        return self.exit_code == 0

    def note(self) -> str:
        """One line for the summary: each node (when split), the counts, setup and test time."""
        shown = [node.line() for node in self.nodes if node.node.total > 1]
        if self.nodes and not any(node.files for node in self.nodes):
            return "; ".join(shown)
        if self.test_seconds is None:
            return "; ".join([*shown, f"setup failed after {self.setup_seconds:.1f} s, "
                              "no tests ran"])
        counts = self.counts.describe() if self.reports else "no JUnit report written"
        return "; ".join(
            [*shown, f"{counts}; setup {self.setup_seconds:.1f} s, "
             f"tests {self.test_seconds:.1f} s"]
        )


def test_script(settings: Settings) -> str:
    """The setup commands (if any), the marker, then the test command; stop at a failure."""
    return script_for(settings, settings.test_command)


def script_for(settings: Settings, command: str) -> str:
    """:func:`test_script` with ``command`` as the test command (a node's share)."""
    marker = f"echo {shlex.quote(SETUP_DONE)}"
    if not settings.test_setup:
        return f"{marker}\n{command}"
    return f"set -e\n{settings.test_setup}\n{marker}\n{command}"


def run_tests(
    engine: Engine,
    settings: Settings,
    *,
    log: Log = print,
    environ: Mapping[str, str] | None = None,
) -> TestResult:
    """Run LAYERKEEP_TEST_COMMAND in the app image against the job's services: on this
    CI node's share of LAYERKEEP_TEST_FILES, or on every local node's at once.

    ``environ`` is where a registry login is found (registry cache backend).
    """
    environ = {} if environ is None else environ
    reports = settings.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    removed = clear_previous_reports(reports)
    if removed:
        log(f"removed {removed} file(s) the previous run wrote in {reports}")
    history = load_history(settings, environ, log=log) if settings.test_files else {}
    split_ci = bool(settings.test_files) and settings.node_total > 1
    committed = commit_time(settings.project_dir, settings.commit) if split_ci else None
    plan = plan_tests(settings, history, log=log, commit_time=committed)
    if plan.shares is not None:
        for node in plan.nodes:
            log(plan.describe(node))
    started = time.monotonic()
    runs = [node for node in plan.nodes if plan.shares is None or plan.shares[node]]
    with contextlib.ExitStack() as stack:
        outboxes = [stack.enter_context(container_outbox(reports, log)) for _ in runs]
        setup_done: dict[Node, float] = {}
        containers = [
            _container_run(
                settings, plan, node, outbox=outbox, started=started,
                setup_done=setup_done, log=log,
            )
            for node, outbox in zip(runs, outboxes, strict=True)
        ]
        if runs:
            log(f"running tests in {settings.require_image()}: {settings.test_command}")
        finished = dict(zip(runs, run_at_once(engine, containers), strict=True))
        written = {
            node: move_reports(outbox, reports, log, rename=_report_suffix(node))
            for node, outbox in zip(runs, outboxes, strict=True)
        }
    record_reports(reports, [path for paths in written.values() for path in paths])
    ended = time.monotonic()
    results = []
    for node in plan.nodes:
        files = plan.shares[node] if plan.shares is not None else ()
        if node not in finished:
            log(f"{node}: no test files in its share, nothing to run")
            results.append(NodeResult(node, files))
            continue
        code, node_ended = finished[node]
        xml = tuple(path for path in written[node] if path.suffix == ".xml")
        test_seconds = node_ended - setup_done[node] if node in setup_done else None
        results.append(NodeResult(node, files, code, xml, count_testcases(xml), test_seconds))
    result = _combined(plan, results, setup_done, started, ended)
    if plan.shares is not None:
        result = _keep_timings(settings, environ, plan, result, log)
    verdict = "passed" if result.exit_code == 0 else f"failed (exit {result.exit_code})"
    log(f"tests {verdict} in {result.seconds:.1f} s: {result.note()}; "
        f"{len(result.reports)} report(s) in {reports}")
    return result


def _container_run(
    settings: Settings,
    plan: Plan,
    node: Node,
    *,
    outbox: Path,
    started: float,
    setup_done: dict[Node, float],
    log: Log,
) -> ContainerRun:
    """The container for ``node``: its share's command, and its output marked with the
    node when several run at once."""
    local = len(plan.nodes) > 1
    prefix = f"{node} | " if local else ""
    command = settings.test_command
    if plan.shares is not None:
        command = share_command(command, plan.shares[node])

    def on_line(line: str) -> None:
        if line == SETUP_DONE and node not in setup_done:
            setup_done[node] = time.monotonic()
            log(f"{prefix}setup done in {setup_done[node] - started:.1f} s; the tests start")
        else:
            log(f"{prefix}{line}")

    return ContainerRun(
        node_settings(settings, node.index) if local else settings,
        script_for(settings, command),
        purpose=f"tests-node{node.index}" if local else "tests",
        mounts=tuple(mounts_for(settings, Mount(outbox, REPORTS_MOUNT))),
        log=on_line,
        node=node.index if local else 1,
    )


def _report_suffix(node: Node) -> str:
    return f"-node{node.index}" if node.total > 1 else ""


def _combined(
    plan: Plan,
    results: list[NodeResult],
    setup_done: Mapping[Node, float],
    started: float,
    ended: float,
) -> TestResult:
    """One result for the nodes: the first failing exit code, every report, the counts
    summed, the slowest setup and tests."""
    ran = [result for result in results if result.files or plan.shares is None]
    codes = [result.exit_code for result in ran if result.exit_code]
    setups = [setup_done[result.node] - started for result in ran if result.node in setup_done]
    tests = [result.test_seconds for result in ran if result.test_seconds is not None]
    setup = max(setups) if setups and len(setups) == len(ran) else ended - started
    counts = CaseCounts()
    for result in ran:
        counts += result.counts
    return TestResult(
        exit_code=codes[0] if codes else 0,
        seconds=ended - started,
        reports=tuple(path for result in ran for path in result.reports),
        counts=counts,
        setup_seconds=setup if ran else 0.0,
        test_seconds=(max(tests) if tests else 0.0) if len(tests) == len(ran) else None,
        nodes=tuple(results) if plan.shares is not None else (),
        split=plan.basis,
    )


def _keep_timings(
    settings: Settings, environ: Mapping[str, str], plan: Plan, result: TestResult, log: Log
) -> TestResult:
    """Save the seconds each file of the shares took, for the next split; warn about a
    node whose reports show files outside its share (a command that names its tests)."""
    every = [file.path for file in plan.files]
    seconds: dict[str, float] = {}
    for node in result.nodes:
        ran = file_seconds(node.reports, every, log=log)
        outside = sorted(set(ran) - set(node.files))
        if outside:
            log(
                f"warning: {node.node} ran tests of {len(outside)} file(s) outside its share "
                f"({', '.join(outside[:3])}): LAYERKEEP_TEST_COMMAND may name the tests "
                f"itself; put {PLACEHOLDER} where it does, so that each node runs its share"
            )
        seconds |= {name: value for name, value in ran.items() if name in node.files}
    saved = save_history(
        settings, environ, measured(seconds, time.time(), settings.commit),
        node=plan.nodes[0],
        keep=set(every), log=log,
    )
    return replace(result, timings_saved=saved)


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
