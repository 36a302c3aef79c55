"""test.run's reports folder (only layerkeep's previous files go), counts, setup vs test time."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from layerkeep.core.engine import Engine
from layerkeep.core.job import Job
from layerkeep.core.settings import Settings, load_settings
from layerkeep.testrun import run as testrun
from layerkeep.testrun.reports_folder import MANIFEST, clear_previous_reports, record_reports
from layerkeep.testrun.run import SETUP_DONE, CaseCounts, count_testcases, run_tests

PYTEST_XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
<testcase classname="t" name="a"/>
<testcase classname="t" name="b"><failure message="no">x</failure></testcase>
<testcase classname="t" name="c"><skipped message="later"/></testcase>
<testcase classname="t" name="d"><error message="fixture">y</error></testcase>
<testcase classname="t" name="e"><system-out>hi</system-out></testcase>
</testsuite></testsuites>
"""
# What Django's runner (unittest-xml-reporting) and JUnit 4 write: a bare testsuite.
BARE_SUITE = '<testsuite tests="2"><testcase name="x"/><testcase name="y"/></testsuite>'


def test_counts_come_from_every_report(tmp_path: Path) -> None:
    (tmp_path / "a.xml").write_text(PYTEST_XML)
    (tmp_path / "b.xml").write_text(BARE_SUITE)
    (tmp_path / "broken.xml").write_text("<testsuite><testcase")
    counts = count_testcases(sorted(tmp_path.glob("*.xml")))
    assert counts == CaseCounts(
        passed=4, failed=1, skipped=1, errors=1, unreadable=(tmp_path / "broken.xml",)
    )
    assert counts.describe() == "4 passed, 1 failed, 1 errors, 1 skipped, broken.xml unreadable"
    assert CaseCounts(passed=3).describe() == "3 passed"


def test_the_note_shows_counts_and_both_times(tmp_path: Path) -> None:
    report = (tmp_path / "junit.xml",)
    done = testrun.TestResult(0, 9.0, report, CaseCounts(passed=12, skipped=1), 2.04, 6.96)
    assert done.note() == "12 passed, 1 skipped; setup 2.0 s, tests 7.0 s"
    silent = testrun.TestResult(0, 3.0, (), CaseCounts(), 1.0, 2.0)
    assert silent.note() == "no JUnit report written; setup 1.0 s, tests 2.0 s"
    broken_setup = testrun.TestResult(3, 4.0, (), CaseCounts(), 4.0, None)
    assert broken_setup.note() == "setup failed after 4.0 s, no tests ran"


def test_only_files_the_manifest_lists_are_removed(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    (reports / "sub").mkdir(parents=True)
    for name in ("junit.xml", "sub/coverage.xml", "mine.txt"):
        (reports / name).write_text(name)
    (tmp_path / "outside.txt").write_text("keep")
    record_reports(reports, [reports / "junit.xml", reports / "sub" / "coverage.xml"])
    manifest = json.loads((reports / MANIFEST).read_text())
    assert manifest["files"] == ["junit.xml", "sub/coverage.xml"]
    # A hand-edited manifest naming paths outside the folder removes nothing there.
    manifest["files"] += ["../outside.txt", str(tmp_path / "outside.txt"), 7, "gone.xml"]
    (reports / MANIFEST).write_text(json.dumps(manifest))

    assert clear_previous_reports(reports) == 2

    assert sorted(p.name for p in reports.rglob("*")) == ["mine.txt", "sub"]
    assert (tmp_path / "outside.txt").read_text() == "keep"
    assert clear_previous_reports(reports) == 0  # the manifest went with them


def test_a_damaged_manifest_is_dropped_and_removes_nothing(tmp_path: Path) -> None:
    (tmp_path / "junit.xml").write_text("x")
    (tmp_path / MANIFEST).write_text("{not json")
    assert clear_previous_reports(tmp_path) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["junit.xml"]


def test_the_script_marks_where_the_setup_ends(tmp_path: Path) -> None:
    plain = load_settings(tmp_path, {"LAYERKEEP_TEST_COMMAND": "pytest"})
    assert testrun.test_script(plain) == f"echo '{SETUP_DONE}'\npytest"
    environ = {"LAYERKEEP_TEST_COMMAND": "pytest", "LAYERKEEP_TEST_SETUP": "a"}
    setup = load_settings(tmp_path, environ)
    assert testrun.test_script(setup) == f"set -e\na\necho '{SETUP_DONE}'\npytest"


# --- on the real engine ---------------------------------------------------------------


BUILD_ID = uuid.uuid4().hex[:10]


def app_settings(root: Path, image: str, command: str, setup: str = "") -> Settings:
    return load_settings(
        root,
        {
            "LAYERKEEP_IMAGE": image,
            "LAYERKEEP_PROJECT": "reports-test",
            "LAYERKEEP_BUILD_ID": BUILD_ID,
            "LAYERKEEP_TEST_COMMAND": command,
            "LAYERKEEP_TEST_SETUP": setup,
            "LAYERKEEP_REPORTS_DIR": "reports",
            "LAYERKEEP_COMMIT": "abc",
            "LAYERKEEP_BRANCH": "main",
        },
    )


@pytest.mark.docker
def test_a_run_that_writes_no_junit_leaves_no_stale_one(
    engine: Engine, tmp_path: Path, unique_repository: str
) -> None:
    image = f"{unique_repository}/app"
    engine.tag_image("python:3.11-slim", f"{image}:latest")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "README.txt").write_text("the user's own file\n")
    junit = json.dumps(PYTEST_XML)
    first = app_settings(
        tmp_path,
        image,
        f"sleep 1; python3 -c 'open(\"/reports/junit.xml\", \"w\").write({junit})'",
        setup="sleep 1.5",
    )
    lines: list[str] = []
    engine = engine.for_job(Job.from_settings(first))

    done = run_tests(engine, first, log=lines.append)

    assert done.exit_code == 0
    assert done.reports == (reports / "junit.xml",)
    assert done.counts == CaseCounts(passed=2, failed=1, skipped=1, errors=1)
    assert done.setup_seconds >= 1.5
    assert done.test_seconds is not None
    assert 1.0 <= done.test_seconds < done.seconds - 1.5
    assert SETUP_DONE not in lines
    assert any(line.startswith("setup done in ") for line in lines)
    assert done.note().startswith("2 passed, 1 failed, 1 errors, 1 skipped; setup ")

    second = app_settings(tmp_path, image, "echo the tests crashed early; exit 4")
    lines.clear()
    crashed = run_tests(engine, second, log=lines.append)

    assert crashed.exit_code == 4
    assert crashed.reports == ()
    assert crashed.note().startswith("no JUnit report written; setup ")
    assert "removed 1 file(s) the previous run wrote in" in lines[0]
    assert sorted(p.name for p in reports.iterdir()) == [MANIFEST, "README.txt"]
    assert (reports / "README.txt").read_text() == "the user's own file\n"

    failed_setup = app_settings(tmp_path, image, "true", setup="exit 3")
    broken = run_tests(engine, failed_setup, log=lambda _: None)
    assert broken.exit_code == 3
    assert broken.test_seconds is None
    assert broken.note().startswith("setup failed after ")
