"""What each step of a build reads besides its text: images, stages, build args, files.

A build record (building.build_records) keeps these per step, so that a miss can be
told by what changed (building.explain): the id a base or ``--from`` image resolves to
and its content, the earlier stage a step builds on, a hash of each build arg it sees
(never the value), and a digest of each context file a COPY/ADD reads (content and
mode, not mtime), listed with the ignore rules the builder itself applies and docker-py's
matcher.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerkeep.building.context import ignore_file
from layerkeep.building.dockerfile import (
    Dockerfile,
    Instruction,
    Stage,
    earlier_stage,
    expand,
    parse_dockerfile,
)
from layerkeep.core.engine import Engine, context_files, image_content, read_ignore_file
from layerkeep.core.settings import Settings


@dataclass(frozen=True)
class Identity:
    """How an image is known: its id on this engine, and its content on any engine (ids
    differ between the classic image store and the containerd store)."""

    id: str
    content: str


ImageLookup = Callable[[str], Identity | None]


def _identity(attrs: Mapping[str, Any] | None) -> Identity | None:
    """An image's identity from the engine's inspect record (None: no such image)."""
    if attrs is None:
        return None
    text = json.dumps(image_content(attrs))
    return Identity(str(attrs["Id"]), "sha256:" + hashlib.sha256(text.encode()).hexdigest())


def engine_lookup(engine: Engine) -> ImageLookup:
    """Each image's identity on ``engine``, by name or id."""
    return lambda reference: _identity(engine.image_attrs(reference))


@dataclass(frozen=True)
class Step:
    """One instruction and what it reads besides its text.

    ``inputs`` keys: ``image:<ref>`` (the id a base or ``--from`` image resolves to) and
    ``content:<ref>`` (that image's content, see ``Identity``), ``stage:<name>`` (an
    earlier stage it builds on), ``arg:<NAME>`` (hash of the value), ``file:<path>``
    (digest of a context file or folder).
    """

    text: str
    inputs: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StageInputs:
    """A stage's steps, its FROM first."""

    name: str | None
    steps: tuple[Step, ...]

    def label(self, index: int, last: bool) -> str:
        """How a line names the stage."""
        return self.name or ("final stage" if last else f"stage {index}")


def read_inputs(
    dockerfile: Path,
    build_args: Mapping[str, str],
    *,
    lookup: ImageLookup,
    files: ContextFiles,
) -> list[StageInputs]:
    """Every stage's steps and their inputs, as the builder sees them now.

    ``lookup`` finds a base or ``--from`` image (``engine_lookup``); ``files`` is the
    context as the builder reads it (``ContextFiles.for_build``).
    """
    parsed = parse_dockerfile(dockerfile.read_text("utf-8"))
    args = dict(build_args)
    stages: list[StageInputs] = []
    for stage in parsed.stages:
        steps = [_from_step(lookup, stage, parsed, args)]
        scope: dict[str, str | None] = {}
        for instruction in stage.instructions[1:]:
            if instruction.keyword == "ARG":
                for arg, default in instruction.declared().items():
                    known = default if default is not None else parsed.global_args.get(arg)
                    scope[arg] = args.get(arg, known)
                hashes = {f"arg:{a}": _arg_hash(a, v) for a, v in scope.items()}
                steps.append(Step(instruction.text, hashes))
            elif instruction.keyword in {"COPY", "ADD"}:
                steps.append(_copy_step(lookup, instruction, files, parsed.stages, stage.index))
            else:
                steps.append(Step(instruction.text))
        stages.append(StageInputs(stage.name, tuple(steps)))
    return stages


def _image_inputs(lookup: ImageLookup, image: str) -> dict[str, str]:
    found = lookup(image)
    if found is None:
        return {f"image:{image}": "absent"}
    return {f"image:{image}": found.id, f"content:{image}": found.content}


def _from_step(
    lookup: ImageLookup, stage: Stage, parsed: Dockerfile, args: Mapping[str, str]
) -> Step:
    text = stage.instructions[0].text
    if earlier_stage(parsed.stages, stage.index, stage.base) is not None:
        return Step(text, {f"stage:{stage.base.lower()}": ""})
    resolved = expand(stage.base, {**parsed.global_args, **args})
    if resolved.lower() == "scratch":
        return Step(text)
    return Step(text, _image_inputs(lookup, resolved))


def _copy_step(
    lookup: ImageLookup,
    instruction: Instruction,
    files: ContextFiles,
    stages: Sequence[Stage],
    index: int,
) -> Step:
    source = instruction.flag("from")
    if source is not None:
        named = earlier_stage(stages, index, source) is not None
        if named or (source.isdigit() and int(source) < index):
            return Step(instruction.text, {f"stage:{source.lower()}": ""})
        return Step(instruction.text, _image_inputs(lookup, source))
    readable = [  # not a URL, a heredoc, nor a path with a variable
        s for s in instruction.sources() if not ("://" in s or s.startswith("<<") or "$" in s)
    ]
    digests = {f"file:{path}": files.digest(path) for path in files.matching(readable)}
    return Step(instruction.text, digests)


def _arg_hash(name: str, value: str | None) -> str:
    # A short keyed digest tells "changed" apart without keeping the value anywhere.
    if value is None:
        return "unset"
    return hashlib.sha256(f"layerkeep build arg\0{name}\0{value}".encode()).hexdigest()[:16]


class ContextFiles:
    """The context as a build sees it: paths listed once, each digested when first read,
    unless ``known`` (the last record's files) has it with the same size and mtime."""

    def __init__(
        self, root: Path, rules: Sequence[str], known: Mapping[str, tuple[int, int, str]]
    ) -> None:
        self.root = root
        self.rules = rules
        self.known = known
        self._paths: list[str] | None = None
        self.read: dict[str, tuple[int, int, str]] = {}

    @classmethod
    def for_build(
        cls,
        settings: Settings,
        *,
        dockerfile: Path,
        builder: str,
        excludes: Sequence[str],
        known: Mapping[str, tuple[int, int, str]],
    ) -> ContextFiles:
        """The context of ``settings`` as ``builder`` reads it: the builder's ignore
        rules, then layerkeep's own (building.context)."""
        context = settings.context
        rules = [*read_ignore_file(ignore_file(context, dockerfile, builder)), *excludes]
        return cls(context, rules, known)

    def matching(self, sources: Iterable[str]) -> list[str]:
        """Paths a COPY of ``sources`` reads: each source, a folder's content, or a glob's."""
        if self._paths is None:
            self._paths = context_files(self.root, self.rules)
        patterns = [posixpath.normpath(source.lstrip("/")).split("/") for source in sources]
        return [p for p in self._paths if any(_under(p.split("/"), pat) for pat in patterns)]

    def digest(self, path: str) -> str:
        """Type, mode and content (a link's target): what a COPY's cache key covers."""
        if path not in self.read:
            try:
                info = (self.root / path).lstat()
                size, mtime = info.st_size, info.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            known = self.known.get(path)
            if known is not None and known[:2] == (size, mtime) and size >= 0:
                self.read[path] = known
            else:
                self.read[path] = (size, mtime, _digest(self.root / path))
        return self.read[path][2]


def _under(path: list[str], pattern: list[str]) -> bool:
    if pattern == ["."]:
        return True
    return len(path) >= len(pattern) and all(
        fnmatch.fnmatchcase(part, want) for part, want in zip(path, pattern, strict=False)
    )


def _digest(path: Path) -> str:
    try:
        info = path.lstat()
        digest = hashlib.sha256(f"{info.st_mode:o}\0".encode())
        if stat.S_ISLNK(info.st_mode):
            digest.update(str(path.readlink()).encode())
        elif stat.S_ISREG(info.st_mode):
            with path.open("rb") as stream:
                while chunk := stream.read(1 << 20):
                    digest.update(chunk)
    except OSError as error:
        return f"unreadable: {error.strerror}"
    return digest.hexdigest()[:16]
