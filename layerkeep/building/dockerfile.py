"""Read the stages of a Dockerfile: what multi-stage caching needs to know."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DIRECTIVE = re.compile(r"^#\s*escape\s*=\s*(\S)\s*$", re.IGNORECASE)
_FROM = re.compile(
    r"^FROM\s+(?:--\S+\s+)*(?P<base>\S+)(?:\s+AS\s+(?P<name>\S+))?\s*$", re.IGNORECASE
)


@dataclass(frozen=True)
class Stage:
    """One ``FROM`` section: its position, its name (if any) and its base image."""

    index: int
    name: str | None
    base: str


def instructions(text: str) -> list[str]:
    """Logical instruction lines: continuations joined, comments and blanks dropped."""
    escape = "\\"
    lines = text.splitlines()
    for line in lines:
        match = _DIRECTIVE.match(line.strip())
        if match:
            escape = match.group(1)
        elif not line.strip().startswith("#"):
            break
    result: list[str] = []
    current = ""
    for raw in lines:
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are skipped
        if stripped.endswith(escape):
            current += stripped[: -len(escape)] + " "
            continue
        result.append((current + stripped).strip())
        current = ""
    if current.strip():
        result.append(current.strip())
    return result


def read_stages(text: str) -> list[Stage]:
    """Every stage of the Dockerfile, in order."""
    stages: list[Stage] = []
    for line in instructions(text):
        match = _FROM.match(line)
        if match:
            name = match["name"].lower() if match["name"] else None
            stages.append(Stage(index=len(stages), name=name, base=match["base"]))
    return stages
