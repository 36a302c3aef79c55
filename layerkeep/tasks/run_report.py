"""A run's rows (a task's result, time and note), and its report: the JSON file and
the CI's job summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from invoke.tasks import Task

from layerkeep.core.outcome import (
    Result,
    TaskRecord,
    markdown_summary,
    report_document,
    write_report,
)
from layerkeep.core.settings import Settings

from .layerkeep_task import Done, Skipped, role_of, title_of
from .taskkit import environ, say


def task_row(
    task: Task[Any], result: Any, *, dry: bool, seconds: float, cleanup: bool, started: float
) -> TaskRecord:
    """The row of a task that returned ``result`` (``Skipped``, ``Done``, a note or
    nothing); ``started`` is the wall-clock time it started at."""
    outcome: Result = "ok"
    text, figures = "", {}
    if isinstance(result, Skipped):
        outcome, text = "skipped", result.reason
    elif dry:
        outcome = "would run"
    elif isinstance(result, Done):
        text, figures = result.note, dict(result.figures)
    elif isinstance(result, str):
        text = result
    return TaskRecord(title_of(task), outcome, seconds, text, cleanup, started, figures)


def summary_rows(
    tasks: Sequence[Task[Any]], records: Mapping[Task[Any], TaskRecord]
) -> list[TaskRecord]:
    """The plan's rows in order (not run where the run stopped), then extra cleanups."""
    rows = [
        records.get(task, TaskRecord(title_of(task), "not run"))
        for task in tasks
        if role_of(task) != "group"
    ]
    rows += [
        record
        for task, record in records.items()
        if task not in tasks and role_of(task) != "group"
    ]
    return rows


def publish(
    rows: list[TaskRecord], settings: Settings, *, entries: Sequence[Task[Any]], error: str
) -> None:
    """The JSON report in the reports folder; the CI's job summary where it has one."""
    job = {
        "project": settings.project,
        "build_id": settings.build_id,
        "commit": settings.commit,
        "branch": settings.branch,
    }
    try:
        write_report(settings.reports_dir, report_document(rows, job=job, error=error))
        step_summary = environ().get("GITHUB_STEP_SUMMARY")
        if step_summary:
            title = f"layerkeep: {', '.join(title_of(t) for t in entries)}"
            with Path(step_summary).open("a", encoding="utf-8") as stream:
                stream.write(markdown_summary(rows, title=title))
    except OSError as failure:
        say(f"warning: could not write the run report: {failure}")
