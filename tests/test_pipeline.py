"""The pipeline runner: order, stop at the first failure, cleanup always, the summary."""

from __future__ import annotations

import pytest

from layerkeep.core.errors import CommandFailed, LayerkeepError
from layerkeep.pipeline import Step, format_summary, insert_step, run_pipeline


def recorder(calls: list[str], name: str, fail: bool = False) -> Step:
    def run() -> str:
        calls.append(name)
        if fail:
            raise CommandFailed(f"{name} broke", return_code=7)
        return f"{name} note"

    return Step(name, run)


def test_steps_run_in_order_and_cleanup_runs_last() -> None:
    calls: list[str] = []
    report = run_pipeline(
        [recorder(calls, "a"), recorder(calls, "b")], cleanup=[recorder(calls, "down")],
        log=lambda _: None,
    )
    assert calls == ["a", "b", "down"]
    assert report.passed
    assert [r.result for r in report.records] == ["ok", "ok", "ok"]
    assert report.records[0].note == "a note"


def test_a_failure_skips_the_rest_but_not_cleanup() -> None:
    calls: list[str] = []
    report = run_pipeline(
        [recorder(calls, "a"), recorder(calls, "b", fail=True), recorder(calls, "c")],
        cleanup=[recorder(calls, "down")],
        log=lambda _: None,
    )
    assert calls == ["a", "b", "down"]
    assert [r.result for r in report.records] == ["ok", "failed", "skipped", "ok"]
    assert isinstance(report.error, CommandFailed)
    assert report.error.exit_code == 7
    assert "b broke" in report.records[1].note


def test_cleanup_runs_even_on_an_unexpected_exception() -> None:
    calls: list[str] = []

    def explode() -> str:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_pipeline([Step("x", explode)], cleanup=[recorder(calls, "down")], log=lambda _: None)
    assert calls == ["down"]


def test_a_failing_cleanup_is_reported_when_the_steps_passed() -> None:
    calls: list[str] = []
    report = run_pipeline([recorder(calls, "a")], cleanup=[recorder(calls, "down", fail=True)],
                          log=lambda _: None)
    assert not report.passed
    assert report.records[-1].result == "failed"


def test_insert_step_after_a_named_step() -> None:
    calls: list[str] = []
    steps = [recorder(calls, "a"), recorder(calls, "b")]
    insert_step(steps, recorder(calls, "mine"), after="a")
    insert_step(steps, recorder(calls, "last"), after="")
    assert [s.name for s in steps] == ["a", "mine", "b", "last"]
    with pytest.raises(LayerkeepError, match="no such step"):
        insert_step(steps, recorder(calls, "x"), after="nope")


def test_summary_table() -> None:
    calls: list[str] = []
    report = run_pipeline(
        [recorder(calls, "image.build"), recorder(calls, "test.run", fail=True)],
        cleanup=[], log=lambda _: None,
    )
    lines = format_summary(report).splitlines()
    assert lines[0].split() == ["step", "result", "time"]
    assert lines[1].split()[:2] == ["image.build", "ok"]
    assert "image.build note" in lines[1]
    assert lines[2].split()[:2] == ["test.run", "failed"]
    assert lines[-1].startswith("total")
