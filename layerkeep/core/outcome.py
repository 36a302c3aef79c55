"""How each task of a run went, and the summary table printed at its end."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Result = Literal["ok", "warn", "failed", "skipped", "not run", "would run"]


@dataclass(frozen=True)
class TaskRecord:
    """One task of a run: its name, result, time and a one-line note."""

    name: str
    result: Result
    seconds: float = 0.0
    note: str = ""
    cleanup: bool = False


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
