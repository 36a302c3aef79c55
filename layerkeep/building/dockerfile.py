"""Read a Dockerfile: its instructions, stages, ARGs, flags and RUN mounts.

The one parser of the language in layerkeep: the build plan (stages to tag), the cache
mounts to keep (building.cache_mounts), what each step reads (building.step_inputs),
the context's checks (building.context) and the checks before a run (preflight) all
read a Dockerfile through it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

_DIRECTIVE = re.compile(r"^#\s*(?P<name>[A-Za-z]+)\s*=\s*(?P<value>\S+)")
_ESCAPES = ("\\", "`")
_FLAGS = re.compile(r"^(?:--\S+\s+)*")
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>[A-Za-z_]\w*)\}|(?P<plain>[A-Za-z_]\w*))")


def directives(text: str) -> dict[str, str]:
    """The parser directives atop a Dockerfile (``# escape=``, ``# syntax=``): name in
    lower case -> value."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        match = _DIRECTIVE.match(stripped)
        if match:
            found.setdefault(match["name"].lower(), match["value"])
    return found


def instructions(text: str) -> list[str]:
    """Logical instruction lines: continuations joined, comments and blanks dropped."""
    escape = directives(text).get("escape", "\\")
    if escape not in _ESCAPES:
        escape = "\\"
    lines = text.splitlines()
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


@dataclass(frozen=True)
class Instruction:
    """One instruction, its whitespace collapsed: ``COPY --from=deps /a /b``."""

    text: str

    @property
    def keyword(self) -> str:
        """``RUN``, ``COPY``, ...: the first word, upper case."""
        return self.text.partition(" ")[0].upper()

    @property
    def flags(self) -> list[tuple[str, str]]:
        """The leading ``--name=value`` flags: (name in lower case, value)."""
        words = _FLAGS.match(self._rest)
        pairs = [word[2:].partition("=") for word in (words[0] if words else "").split()]
        return [(name.lower(), value) for name, _, value in pairs]

    @property
    def args(self) -> str:
        """What follows the keyword and its flags."""
        return _FLAGS.sub("", self._rest)

    def flag(self, name: str) -> str | None:
        """The value of the first ``--<name>`` flag; None without one."""
        return next((value for flag, value in self.flags if flag == name), None)

    def mounts(self) -> list[dict[str, str]]:
        """Each ``--mount`` of a RUN as fields: ``type=cache,target=/x,ro`` gives
        {"type": "cache", "target": "/x", "ro": ""}."""
        if self.keyword != "RUN":
            return []
        return [_fields(value) for flag, value in self.flags if flag == "mount"]

    def sources(self) -> list[str]:
        """The sources of a COPY/ADD: every word but the destination (JSON form too)."""
        if self.keyword not in {"COPY", "ADD"}:
            return []
        text = self.args
        if text.startswith("["):
            try:
                parts = json.loads(text)
            except json.JSONDecodeError:
                parts = None
            if isinstance(parts, list):
                return [str(part) for part in parts[:-1]]
        return text.split()[:-1]

    def declared(self) -> dict[str, str | None]:
        """An ARG's names and defaults: ``ARG A=1 B`` gives {"A": "1", "B": None}."""
        if self.keyword != "ARG":
            return {}
        declared: dict[str, str | None] = {}
        for word in self.args.split():
            name, equals, default = word.partition("=")
            declared[name] = default.strip("\"'") if equals else None
        return declared

    @property
    def _rest(self) -> str:
        return self.text.partition(" ")[2]


def _fields(value: str) -> dict[str, str]:
    row = next(csv.reader([value]), [])
    fields: dict[str, str] = {}
    for item in row:
        name, _, text = item.partition("=")
        fields[name.strip().lower()] = text.strip()
    return fields


@dataclass(frozen=True)
class Stage:
    """One ``FROM`` section: its position, its name (if any), its base image as written,
    and its instructions, the FROM first."""

    index: int
    name: str | None
    base: str
    instructions: tuple[Instruction, ...] = ()


@dataclass(frozen=True)
class Dockerfile:
    """A Dockerfile's stages, and the ``ARG`` defaults declared before the first FROM
    (None for an ARG without one): what FROM lines may use."""

    global_args: Mapping[str, str | None]
    stages: tuple[Stage, ...]


def parse_dockerfile(text: str) -> Dockerfile:
    """The stages and global ARGs of the Dockerfile ``text``."""
    global_args: dict[str, str | None] = {}
    sections: list[list[Instruction]] = []
    for instruction in read_instructions(text):
        if instruction.keyword == "FROM":
            sections.append([instruction])
        elif sections:
            sections[-1].append(instruction)
        else:
            global_args.update(instruction.declared())
    return Dockerfile(global_args, tuple(_stage(i, lines) for i, lines in enumerate(sections)))


def _stage(index: int, lines: list[Instruction]) -> Stage:
    words = lines[0].args.split()
    base = words[0] if words else ""
    name = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
    return Stage(index, name, base, tuple(lines))


def read_instructions(text: str) -> list[Instruction]:
    """Every instruction of the Dockerfile, in order."""
    return [Instruction(" ".join(line.split())) for line in instructions(text)]


def read_stages(text: str) -> list[Stage]:
    """Every stage of the Dockerfile, in order."""
    return list(parse_dockerfile(text).stages)


def earlier_stage(stages: Sequence[Stage], index: int, reference: str) -> Stage | None:
    """The stage before ``index`` named ``reference`` (a FROM's base or a ``--from``);
    None when it names an image."""
    wanted = reference.lower()
    return next((stage for stage in stages[:index] if stage.name == wanted), None)


def root_stage(stages: Sequence[Stage], index: int) -> Stage:
    """The stage whose base is an image, following a stage built on an earlier one."""
    stage = stages[index]
    while (parent := earlier_stage(stages, stage.index, stage.base)) is not None:
        stage = parent
    return stage


def expand(text: str, values: Mapping[str, str | None]) -> str:
    """``$NAME`` and ``${NAME}`` replaced by their values; one without a value stays."""

    def value(match: re.Match[str]) -> str:
        found = values.get(match["braced"] or match["plain"])
        return found if found is not None else match[0]

    return _VARIABLE.sub(value, text)
