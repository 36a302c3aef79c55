"""How each task of a run went: the summary table, the JSON report, the CI's job summary.

The JSON report (``layerkeep-report.json`` in the reports folder) follows
``layerkeep/core/report.schema.json``; the README documents it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from layerkeep.core.atomic import atomic_write

Result = Literal["ok", "warn", "failed", "skipped", "not run", "would run"]
REPORT_NAME = "layerkeep-report.json"
SCHEMA_PATH = Path(__file__).with_name("report.schema.json")
REPORT_VERSION = 1


@dataclass(frozen=True)
class TaskRecord:
    """One task of a run: its name, result, time, a one-line note and its figures."""

    name: str
    result: Result
    seconds: float = 0.0
    note: str = ""
    cleanup: bool = False
    started: float = 0.0
    figures: Mapping[str, Any] = field(default_factory=dict)


def format_summary(records: Sequence[TaskRecord]) -> str:
    """A table: task, result, duration, note; cleanup rows marked, and a total."""
    rows = [("task", "result", "time", "")] + [
        (
            f"{r.name} (cleanup)" if r.cleanup else r.name,
            r.result,
            f"{r.seconds:.1f} s",
            r.note,
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [
        f"{name:<{widths[0]}}  {result:<{widths[1]}}  {seconds:>{widths[2]}}  {note}".rstrip()
        for name, result, seconds, note in rows
    ]
    total = sum(r.seconds for r in records)
    lines.append(f"{'total':<{widths[0]}}  {'':<{widths[1]}}  {f'{total:.1f} s':>{widths[2]}}")
    return "\n".join(lines)


def report_document(
    records: Sequence[TaskRecord], *, job: Mapping[str, str], error: str = ""
) -> dict[str, Any]:
    """The run as a JSON-ready document (see report.schema.json)."""
    return {
        "version": REPORT_VERSION,
        "job": dict(job),
        "passed": not any(r.result == "failed" for r in records),
        "error": error,
        "seconds": round(sum(r.seconds for r in records), 3),
        "tasks": [
            {
                "name": r.name,
                "result": r.result,
                "cleanup": r.cleanup,
                "started": round(r.started, 3),
                "seconds": round(r.seconds, 3),
                "note": r.note,
                "figures": dict(r.figures),
            }
            for r in records
        ],
    }


def write_report(folder: Path, document: Mapping[str, Any]) -> Path:
    """Write ``layerkeep-report.json`` into ``folder`` atomically; its path."""
    target = folder / REPORT_NAME
    text = json.dumps(document, indent=2, sort_keys=True) + "\n"
    atomic_write(target, text.encode(), mode=0o644)
    return target


def markdown_summary(records: Sequence[TaskRecord], *, title: str) -> str:
    """The run as a Markdown table, for a CI's job summary page."""
    icons = {"ok": "✅", "warn": "⚠️", "failed": "❌", "skipped": "⏭️", "not run": "·"}
    lines = [f"### {title}", "", "| task | result | time | note |", "|---|---|---|---|"]
    for r in records:
        name = f"{r.name} (cleanup)" if r.cleanup else r.name
        note = r.note.replace("|", "\\|")
        icon = icons.get(r.result, "")
        lines.append(f"| {name} | {icon} {r.result} | {r.seconds:.1f} s | {note} |")
    lines.append(f"| **total** | | {sum(r.seconds for r in records):.1f} s | |")
    return "\n".join(lines) + "\n\n"
