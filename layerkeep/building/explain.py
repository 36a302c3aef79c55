"""Say why a build missed the cache, from a record of what each step read.

After a build, ``explain_misses`` takes, per stage, the first step the builder did not
reuse, and compares that stage with the record of the build that made the cached
images: each instruction's text, the id its base image resolves to, the build args it
sees (a hash of each value, never the value) and the context files each COPY/ADD reads
(a digest of content and mode, not mtime), listed with the ``.dockerignore`` rules the
builder itself applies and docker-py's matcher. The first difference at or before the
missed step is the reason. Then it records this build, keyed by the images it made, so
that the next build (on a fresh machine too) finds the record of the build its restored
images came from. An image is known by its id and by its content (layers and creation
time): ids differ between the classic image store (a config's digest) and the
containerd store (a manifest's), so a cache crossing stores is matched by content.

Where records live: the build keeps them in a tiny local image ``<image>:<tag>-build-
record`` whose one file is the JSON (the engine is where the images they describe are),
and cache.save carries them with the cache (cache.record_store):

- dir backend: ``build-records.json`` in LAYERKEEP_CACHE_DIR, written after the layers
  (a build never touches the cache folder; only a save changes it), read from there by
  the next build;
- registry backend: the record image itself, pushed beside the cache tags and pulled
  by cache.load. A file layer rather than a label: a label travels in the API's query
  string, which a large context's file list would overflow.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import io
import json
import posixpath
import re
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from layerkeep.building.context import IGNORE_SUFFIX
from layerkeep.building.dockerfile import instructions
from layerkeep.building.output import StepTally
from layerkeep.core.engine import Engine, context_files, image_content
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.imageref import ImageRef, is_valid_tag
from layerkeep.core.settings import Settings

Log = Callable[[str], None]
FORMAT = "layerkeep-build-record/1"
RECORDS_FILE = "build-records.json"
RECORD_TAG_SUFFIX = "-build-record"
RECORD_LABEL = "io.layerkeep.building-record"
_KEEP = 5  # records kept: a cache may hold images of a build older than the last one
_SHOWN = 3  # paths named in a line before "and N more"
_TEXT = 80  # characters of an instruction shown
_VERTEX = {"RUN", "COPY", "ADD", "WORKDIR"}  # the instructions BuildKit numbers as steps
_FLAGS = re.compile(r"^(?:--\S+\s+)*")
_VARIABLE = re.compile(r"\$(?:\{(?P<braced>\w+)\}|(?P<plain>\w+))")


@dataclass(frozen=True)
class Identity:
    """How an image is known: its id on this engine, and its content on any engine."""

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


class MissLine(str):
    """One line saying why a stage missed, exactly as logged; a line on changed context
    files names only a few of them, and ``files`` holds them all (path -> ``changed``,
    ``added`` or ``removed``, the user's own files first)."""

    stage: str
    files: Mapping[str, str]

    def __new__(cls, text: str, *, stage: str = "", files: Mapping[str, str] | None = None) -> Self:
        line = super().__new__(cls, text)
        line.stage = stage
        line.files = dict(files or {})
        return line


def miss_files(lines: Iterable[str]) -> dict[str, dict[str, str]]:
    """Stage -> every context file whose change made it miss, from ``explain_misses``'s
    lines (for the run report: the lines name only the first few)."""
    return {
        line.stage: dict(line.files)
        for line in lines
        if isinstance(line, MissLine) and line.files
    }


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


@dataclass(frozen=True)
class Maker:
    """The Docker engine version and the builder (``legacy``/``buildkit``) of a build."""

    engine: str
    builder: str

    def describe(self) -> str:
        """``Docker 26.1.5's BuildKit``, ``Docker 20.10.24's classic builder``."""
        builder = "BuildKit" if self.builder == "buildkit" else "classic builder"
        return f"Docker {self.engine}'s {builder}"

    def unlike(self, other: Maker) -> str | None:
        """Why steps made by ``other`` may not match steps this one makes; None when
        nothing here says so (or ``other`` is not known)."""
        if not (other.engine and other.builder) or other == self:
            return None
        said = f"the cached image was made by {other.describe()}, this build by {self.describe()}"
        if other.builder != self.builder:
            return f"{said}: the two builders never share steps"
        if self.builder == "buildkit" and (_major(other.engine) < 23) != (_major(self.engine) < 23):
            return (
                f"{said}: BuildKit before and since Docker 23 computes different keys for "
                "RUN steps; keep one Docker generation per cache"
            )
        return f"{said}: step keys can differ between Docker versions"


def _major(version: str) -> int:
    head = version.partition(".")[0]
    return int(head) if head.isdigit() else 0


@dataclass(frozen=True)
class BuildRecord:
    """What one build read, the images it made (ids, and contents: see ``Identity``), and
    what made them (the engine's version and the builder). Records of older layerkeeps
    have no contents or maker."""

    images: Mapping[str, str]
    stages: tuple[StageInputs, ...]
    made_by: Maker = field(default_factory=lambda: Maker("", ""))
    contents: Mapping[str, str] = field(default_factory=dict)
    # Each context file read: (size, mtime in ns, digest). git.touch makes a committed
    # file's mtime its last commit's time on every machine, so the next build reuses the
    # digest of a file whose size and mtime are the same, instead of reading it.
    files: Mapping[str, tuple[int, int, str]] = field(default_factory=dict)

    def made_any(self, images: Mapping[str, Identity]) -> bool:
        """Whether this build made one of the images (by name and id, or name and content)."""
        return any(
            self.images.get(name) == found.id or self.contents.get(name) == found.content
            for name, found in images.items()
        )

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values."""
        return {
            "images": dict(self.images),
            "stages": [
                {"name": s.name, "steps": [[x.text, dict(x.inputs)] for x in s.steps]}
                for s in self.stages
            ],
            "engine": self.made_by.engine,
            "builder": self.made_by.builder,
            "contents": dict(self.contents),
            "files": {path: list(known) for path, known in self.files.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BuildRecord:
        """Read what ``to_json`` wrote; KeyError/TypeError/ValueError when malformed."""
        stages = tuple(
            StageInputs(
                stage["name"],
                tuple(
                    Step(str(text), {str(k): str(v) for k, v in inputs.items()})
                    for text, inputs in stage["steps"]
                ),
            )
            for stage in data["stages"]
        )
        made_by = Maker(str(data.get("engine", "")), str(data.get("builder", "")))
        contents = {str(k): str(v) for k, v in data.get("contents", {}).items()}
        files = {
            str(path): (int(size), int(mtime), str(digest))
            for path, (size, mtime, digest) in data.get("files", {}).items()
        }
        return cls(
            {str(k): str(v) for k, v in data["images"].items()}, stages, made_by, contents, files
        )


def explain_misses(
    engine: Engine,
    settings: Settings,
    *,
    dockerfile: Path,
    builder: str,
    excludes: Sequence[str],
    before: Mapping[str, Identity | None],
    tally: StepTally,
    log: Log,
    imported_export: bool = False,
) -> tuple[MissLine, ...]:
    """Log and return one line per stage that missed, then record this build.

    ``before`` maps each image the build tags to what that name found before the build
    (the cached image the builder was given), looked up then because the containerd
    store may no longer know a replaced image by its id; ``tally`` is the builders' step
    tally. ``imported_export``: the builder imported BuildKit's own cache export instead
    of images, made by the newest build on record of the same image.
    """
    lookup = engine_lookup(engine)
    records = kept_records(engine, settings, log=log)
    last = next((r for r in records if set(before) & set(r.images)), None)
    files = ContextFiles.for_build(
        settings, dockerfile=dockerfile, builder=builder, excludes=excludes,
        known=last.files if last else {},
    )
    stages = read_inputs(
        settings, dockerfile=dockerfile, builder=builder, excludes=excludes, lookup=lookup,
        files=files,
    )
    maker = Maker(str(engine.server_version().get("Version", "")), builder)
    cached = {image: found for image, found in before.items() if found}
    missed = first_misses(tally, builder, stages)
    if not missed:
        lines: list[MissLine] = []
    elif imported_export:
        old = next((r for r in records if set(before) & set(r.images)), None)
        lines = [
            _line(stages, index, step, old=old, rebuilt=set(missed), cached=cached, maker=maker)
            for index, step in sorted(missed.items())
        ]
    elif not cached:
        lines = [MissLine("cache miss: no cached image to compare with (cold build)")]
    else:
        old = next((r for r in records if r.made_any(cached)), None)
        lines = [
            _line(stages, index, step, old=old, rebuilt=set(missed), cached=cached, maker=maker)
            for index, step in sorted(missed.items())
        ]
    for line in lines:
        log(line)
    made = {image: found for image in before if (found := lookup(image))}
    record = BuildRecord(
        {image: found.id for image, found in made.items()},
        tuple(stages),
        maker,
        {image: found.content for image, found in made.items()},
        files.read,
    )
    kept = [record, *(r for r in records if r.images != record.images)][:_KEEP]
    if kept != records[:_KEEP]:  # a build that changed nothing skips the image write
        _keep(engine, settings, kept, log)
    return tuple(lines)


def read_inputs(
    settings: Settings,
    *,
    dockerfile: Path,
    builder: str,
    excludes: Sequence[str],
    lookup: ImageLookup,
    files: ContextFiles | None = None,
) -> list[StageInputs]:
    """Every stage's steps and their inputs, as the builder sees them now.

    ``lookup`` finds a base or ``--from`` image (``engine_lookup``); ``files`` is the
    context (by default read whole).
    """
    lines = [" ".join(line.split()) for line in instructions(dockerfile.read_text("utf-8"))]
    if files is None:
        files = ContextFiles.for_build(
            settings, dockerfile=dockerfile, builder=builder, excludes=excludes, known={}
        )
    args = dict(settings.build_args)
    defaults: dict[str, str | None] = {}
    stages: list[StageInputs] = []
    current: list[Step] = []
    name: str | None = None
    scope: dict[str, str | None] = {}
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            if current:
                stages.append(StageInputs(name, tuple(current)))
            name, step = _from_step(lookup, line, rest, args=args, defaults=defaults, stages=stages)
            current, scope = [step], {}
        elif keyword == "ARG":
            declared = _declared(rest)
            if not current:  # before the first FROM: defaults FROM and ARG lines can use
                defaults.update(declared)
                continue
            for arg, default in declared.items():
                scope[arg] = args.get(arg, default if default is not None else defaults.get(arg))
            current.append(Step(line, {f"arg:{a}": _arg_hash(a, v) for a, v in scope.items()}))
        elif keyword in {"COPY", "ADD"} and current:
            current.append(_copy_step(lookup, line, rest, files, stages))
        elif current:
            current.append(Step(line))
    if current:
        stages.append(StageInputs(name, tuple(current)))
    return stages


def first_misses(tally: StepTally, builder: str, stages: Sequence[StageInputs]) -> dict[int, int]:
    """Stage index -> the index (0 is FROM) of its first step the builder did not reuse.

    The classic builder's keys are ``<stage>:<text>``, every instruction a step; BuildKit's
    are ``[<stage> ]<n>/<m>:<text>``, numbering only RUN/COPY/ADD/WORKDIR (and showing
    RUN with its variables filled in, so the number, not the text, finds the step).
    """
    names = {stage.name: index for index, stage in enumerate(stages) if stage.name}
    pointer = dict.fromkeys(range(len(stages)), 1)
    missed: dict[int, int] = {}
    for key, reused in tally.reused_by_key.items():
        place, _, text = key.partition(":")
        if builder == "buildkit":
            found = _buildkit_place(place, stages, names)
        else:
            found = _legacy_place(place, " ".join(text.split()), stages, pointer)
        if found is not None and not reused:
            stage, step = found
            missed[stage] = min(step, missed.get(stage, step))
    return missed


def _legacy_place(
    place: str, text: str, stages: Sequence[StageInputs], pointer: dict[int, int]
) -> tuple[int, int] | None:
    if not place.isdigit() or int(place) >= len(stages):
        return None  # an ARG before the first FROM is a step of no stage
    stage = int(place)
    steps = stages[stage].steps
    for index in range(pointer[stage], len(steps)):
        if steps[index].text == text:
            pointer[stage] = index + 1
            return stage, index
    return None


def _buildkit_place(
    place: str, stages: Sequence[StageInputs], names: Mapping[str, int]
) -> tuple[int, int] | None:
    label, _, numbers = place.rpartition(" ")
    number, _, total = numbers.partition("/")
    if label in names:
        stage = names[label]
    elif label.startswith("stage-") and label[6:].isdigit():
        stage = int(label[6:])
    elif not label and len(stages) == 1:
        stage = 0
    else:
        return None
    if stage >= len(stages) or not (number.isdigit() and total.isdigit()):
        return None
    steps = stages[stage].steps
    vertices = [i for i, s in enumerate(steps) if i and s.text.split(" ")[0].upper() in _VERTEX]
    if int(number) == 1 or len(vertices) != int(total) - 1:
        return None  # FROM itself, or a numbering this reading does not follow
    return stage, vertices[int(number) - 2]


def _line(
    stages: Sequence[StageInputs],
    index: int,
    missed: int,
    *,
    old: BuildRecord | None,
    rebuilt: set[int],
    cached: Mapping[str, Identity],
    maker: Maker,
) -> MissLine:
    stage = stages[index]
    label = stage.label(index, index == len(stages) - 1)
    where = f"cache miss in {label} at {_short(stage.steps[missed].text)}"
    if old is None:
        made = (
            f"made the cached image(s) {', '.join(sorted(cached))}"
            if cached
            else "exported the cache"
        )
        return MissLine(
            f"{where}: unknown: no record of the build that {made}, so nothing to compare with",
            stage=label,
        )
    # How a later step names a stage it builds on: by name, or by index.
    others = {key for i in rebuilt if i != index for key in (stages[i].name, str(i)) if key}
    previous = _matching_stage(old, stage, index)
    if previous is None:
        return MissLine(f"{where}: the recorded build had no such stage", stage=label)
    reason = _first_difference(previous.steps, stage.steps, missed, others)
    if reason:
        files = reason.files if isinstance(reason, MissLine) else None
        return MissLine(f"{where}: {reason}", stage=label, files=files)
    other_maker = maker.unlike(old.made_by)
    if other_maker:
        return MissLine(f"{where}: {other_maker}", stage=label)
    compared = stage.steps[: missed + 1]
    args = {k for s in compared for k in s.inputs if k.startswith("arg:")}
    files_read = {k for s in compared for k in s.inputs if k.startswith("file:")}
    line = (
        f"{where}: unknown: the {len(compared)} instruction(s) up to it, their base image "
        f"id, {len(args)} build arg(s) and {len(files_read)} context file(s) read by "
        "COPY/ADD all match the record of the build that made the cached image"
    )
    if cached and maker.builder == "buildkit":
        line = (
            f"{where}: the cached image's inline cache most likely lacks this step: its "
            f"{len(compared)} instruction(s) up to it, base image, {len(args)} build arg(s) "
            f"and {len(files_read)} context file(s) all match the record of the build that "
            "made it (BuildKit leaves out of an image's inline cache the steps it reused "
            "from an imported cache; cache.save completes it, so this cache was saved "
            "without that)"
        )
    return MissLine(line, stage=label)


def _matching_stage(record: BuildRecord, stage: StageInputs, index: int) -> StageInputs | None:
    if stage.name:
        return next((s for s in record.stages if s.name == stage.name), None)
    if index < len(record.stages) and record.stages[index].name is None:
        return record.stages[index]
    return None


def _first_difference(
    old: Sequence[Step], new: Sequence[Step], missed: int, rebuilt: set[str]
) -> str | None:
    """The first change at or before step ``missed``, in words; None when none."""
    matcher = difflib.SequenceMatcher(
        None, [s.text for s in old], [s.text for s in new], autojunk=False
    )
    for tag, i1, _, j1, j2 in matcher.get_opcodes():
        if j1 > missed:
            return None
        if tag == "equal":
            for offset in range(min(j2, missed + 1) - j1):
                reason = _input_change(old[i1 + offset], new[j1 + offset], rebuilt)
                if reason:
                    return reason
        elif tag == "replace":
            return f"instruction changed: {_short(old[i1].text)} -> {_short(new[j1].text)}"
        elif tag == "insert":
            return f"instruction added: {_short(new[j1].text)}"
        else:
            return f"instruction removed: {_short(old[i1].text)}"
    return None


def _input_change(old: Step, new: Step, rebuilt: set[str]) -> str | None:
    """What differs between two steps of the same text, in words."""
    keys = sorted(set(old.inputs) | set(new.inputs))
    for key in keys:
        kind, _, name = key.partition(":")
        before, after = old.inputs.get(key), new.inputs.get(key)
        if kind == "image" and before != after and not _same_content(old, new, name):
            what = "base image" if new.text.upper().startswith("FROM ") else "image"
            return f"{what} {name} now resolves to {_id(after)} (was {_id(before)})"
        if kind == "stage" and name in rebuilt:
            return f"stage {name}, which it builds on, was rebuilt"
    changed_args = [
        k.partition(":")[2]
        for k in keys
        if k.startswith("arg:") and old.inputs.get(k) != new.inputs.get(k)
    ]
    if changed_args:
        # Names only: a build arg's value may be a secret.
        return f"build argument {', '.join(changed_args)} changed"
    changes = {
        key.partition(":")[2]: "added" if before is None else "removed" if after is None
        else "changed"
        for key in keys
        if key.startswith("file:")
        for before, after in [(old.inputs.get(key), new.inputs.get(key))]
        if before != after
    }  # fmt: skip
    return files_changed(changes) if changes else None


def files_changed(changes: Mapping[str, str]) -> MissLine:
    """Say which context files changed (path -> how), the user's own first.

    Files in a dot-folder (``.git/``, ``.venv/``, ``.pytest_cache/``) are what tools
    write: with ``.git`` in the context, a commit changes a dozen of them, which
    alphabetically come before every source file. So the user's files are named first
    and the others counted per folder: ``16 context files changed: src/app.py (changed)
    and 15 in .git/``. Only when nothing else changed are the tools' files named.
    """
    folder = {path: _tool_folder(path) for path in changes}
    ranked = sorted(changes, key=lambda path: (folder[path] is not None, path))
    yours = [path for path in ranked if folder[path] is None]
    named = (yours or ranked)[:_SHOWN]
    parts = [f"{path} ({changes[path]})" for path in named]
    head = "context files changed"
    if len(named) < len(ranked):
        head = f"{len(ranked)} {head}"
        tools = Counter(name for name in folder.values() if name is not None)
        if not yours:
            head += f", all in {', '.join(sorted(tools))}"
            parts.append(f"{len(ranked) - len(named)} more")
        else:
            if len(yours) > len(named):
                parts.append(f"{len(yours) - len(named)} more")
            parts += [f"{count} in {name}" for name, count in tools.most_common()]
        text = f"{', '.join(parts[:-1])} and {parts[-1]}"
    else:
        text = ", ".join(parts)
    return MissLine(f"{head}: {text}", files={path: changes[path] for path in ranked})


def _tool_folder(path: str) -> str | None:
    """``.git/`` for ``.git/index``, ``web/.cache/`` for ``web/.cache/x``: the path up to
    its first folder whose name starts with a dot; None for the user's own files (a
    dotfile such as ``.env`` is one). ``.git`` itself counts too (a folder, or a
    work tree's file)."""
    parts = path.split("/")
    for depth, part in enumerate(parts):
        if part.startswith(".") and (depth < len(parts) - 1 or part == ".git"):
            return "/".join(parts[: depth + 1]) + "/"
    return None


def _same_content(old: Step, new: Step, image: str) -> bool:
    """Whether an image with another id has the same content (the other image store)."""
    content = old.inputs.get(f"content:{image}")
    return content is not None and content == new.inputs.get(f"content:{image}")


def _image_inputs(lookup: ImageLookup, image: str) -> dict[str, str]:
    found = lookup(image)
    if found is None:
        return {f"image:{image}": "absent"}
    return {f"image:{image}": found.id, f"content:{image}": found.content}


def _from_step(
    lookup: ImageLookup,
    line: str,
    rest: str,
    *,
    args: Mapping[str, str],
    defaults: Mapping[str, str | None],
    stages: Sequence[StageInputs],
) -> tuple[str | None, Step]:
    words = _FLAGS.sub("", rest).split()
    base = words[0] if words else ""
    name = words[2].lower() if len(words) >= 3 and words[1].upper() == "AS" else None
    earlier = {s.name: str(i) for i, s in enumerate(stages) if s.name}
    if base.lower() in earlier:
        return name, Step(line, {f"stage:{base.lower()}": ""})
    resolved = _expand(base, {**defaults, **args})
    if resolved.lower() == "scratch":
        return name, Step(line)
    return name, Step(line, _image_inputs(lookup, resolved))


def _copy_step(
    lookup: ImageLookup,
    line: str,
    rest: str,
    files: ContextFiles,
    stages: Sequence[StageInputs],
) -> Step:
    prefix = _FLAGS.match(rest)
    flags = [word[2:].partition("=") for word in (prefix[0] if prefix else "").split()]
    source = next((value for flag, _, value in flags if flag.lower() == "from"), None)
    if source is not None:
        earlier = {s.name: str(i) for i, s in enumerate(stages) if s.name}
        if source.lower() in earlier or (source.isdigit() and int(source) < len(stages)):
            return Step(line, {f"stage:{source.lower()}": ""})
        return Step(line, _image_inputs(lookup, source))
    words = _sources(_FLAGS.sub("", rest))
    readable = [s for s in words if "://" not in s and not s.startswith("<<") and "$" not in s]
    return Step(line, {f"file:{path}": files.digest(path) for path in files.matching(readable)})


def _sources(text: str) -> list[str]:
    """The sources of COPY/ADD (flags removed): every word but the destination."""
    if text.startswith("["):
        try:
            parts = json.loads(text)
        except json.JSONDecodeError:
            parts = None
        if isinstance(parts, list):
            return [str(part) for part in parts[:-1]]
    return text.split()[:-1]


def _declared(rest: str) -> dict[str, str | None]:
    """``ARG A=1 B``: each name and its default (None when it has none)."""
    declared: dict[str, str | None] = {}
    for word in rest.split():
        arg, equals, default = word.partition("=")
        declared[arg] = default.strip("\"'") if equals else None
    return declared


def _arg_hash(name: str, value: str | None) -> str:
    # A short keyed digest tells "changed" apart without keeping the value anywhere.
    if value is None:
        return "unset"
    return hashlib.sha256(f"layerkeep build arg\0{name}\0{value}".encode()).hexdigest()[:16]


def _expand(text: str, values: Mapping[str, str | None]) -> str:
    def value(match: re.Match[str]) -> str:
        found = values.get(match["braced"] or match["plain"])
        return found if found is not None else match[0]

    return _VARIABLE.sub(value, text)


def _ignore_rules(
    context: Path, dockerfile: Path, builder: str, excludes: Sequence[str]
) -> list[str]:
    """The ignore patterns the builder applies; layerkeep's own come last (building.context)."""
    return [*read_ignore_file(ignore_file(context, dockerfile, builder)), *excludes]


def ignore_file(context: Path, dockerfile: Path, builder: str) -> Path:
    """The ignore file the builder reads (it may not exist): BuildKit reads
    ``<Dockerfile>.dockerignore`` when there is one, the classic builder only the
    context's ``.dockerignore``."""
    own = dockerfile.with_name(dockerfile.name + IGNORE_SUFFIX)
    return own if builder == "buildkit" and own.is_file() else context / ".dockerignore"


def read_ignore_file(path: Path) -> list[str]:
    """The patterns of an ignore file, in order; none when there is no such file."""
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


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
        """The context of ``settings`` as ``builder`` reads it."""
        context = settings.context
        return cls(context, _ignore_rules(context, dockerfile, builder, excludes), known)

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


def _short(text: str) -> str:
    return f"`{text}`" if len(text) <= _TEXT else f"`{text[: _TEXT - 3]}...`"


def _id(image_id: str | None) -> str:
    return (image_id or "nothing")[:19]


# --- where records are kept --------------------------------------------------------------


def record_image(settings: Settings) -> ImageRef | None:
    """The local image holding this engine's build records; None if no tag fits."""
    image = settings.require_image()
    tag = f"{image.tag}{RECORD_TAG_SUFFIX}"
    return image.with_tag(tag) if is_valid_tag(tag) else None


def kept_records(engine: Engine, settings: Settings, *, log: Log) -> list[BuildRecord]:
    """The records of this engine's builds, then (dir backend) those in the cache folder."""
    reference = record_image(settings)
    try:
        text = _read_record_image(engine, reference)
    except DockerOperationError as error:
        log(f"warning: cannot read the build records in {reference}: {error.one_line()}")
        text = None
    records = parse_records(text, where=f"image {reference}", log=log)
    if settings.cache_backend == "dir":
        path = settings.cache_dir / RECORDS_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = None
        except (OSError, UnicodeDecodeError) as error:
            log(f"warning: cannot read the build records {path}: {error}")
            text = None
        known = [record.images for record in records]
        records += [
            record
            for record in parse_records(text, where=str(path), log=log)
            if record.images not in known
        ]
    return records


def records_text(records: Sequence[BuildRecord]) -> str:
    """The records as the JSON document kept in the image or the cache folder."""
    document = {"format": FORMAT, "records": [record.to_json() for record in records[:_KEEP]]}
    return json.dumps(document, separators=(",", ":"))


def parse_records(text: str | None, *, where: str, log: Log) -> list[BuildRecord]:
    """Read ``records_text``'s document; damaged or foreign ones count as none."""
    if text is None:
        return []
    try:
        document = json.loads(text)
        if document.get("format") != FORMAT:
            return []
        return [BuildRecord.from_json(record) for record in document["records"]]
    except (ValueError, KeyError, TypeError, AttributeError):
        log(f"warning: ignored the damaged build records in {where}")
        return []


def _keep(engine: Engine, settings: Settings, records: Sequence[BuildRecord], log: Log) -> None:
    """Replace the local record image; a failure only costs later explanations."""
    reference = record_image(settings)
    if reference is None:
        return
    try:
        _write_record_image(engine, reference, records_text(records))
    except DockerOperationError as error:
        log(f"warning: build record not kept: {error.one_line()}")


_MEMBER = "layerkeep-build-records.json"


def _write_record_image(engine: Engine, reference: ImageRef, text: str) -> None:
    """Replace the local record image with one whose only file is ``text``."""
    data = text.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        member = tarfile.TarInfo(_MEMBER)
        member.size, member.mode = len(data), 0o644
        archive.addfile(member, io.BytesIO(data))
    old = engine.image_id(str(reference))
    new = engine.import_image(
        iter([buffer.getvalue()]),
        reference=str(reference),
        changes=[f"LABEL {RECORD_LABEL}={FORMAT}"],
    )
    engine.tag_image(new, str(reference))
    if old is not None and old != new:
        engine.remove_image(old)


def _read_record_image(engine: Engine, reference: ImageRef | None) -> str | None:
    """The JSON in the local record image, whatever layout ``docker save`` writes."""
    if reference is None or engine.image_id(str(reference)) is None:
        return None
    saved = io.BytesIO(b"".join(engine.save_image(str(reference))))
    with tarfile.open(fileobj=saved) as outer:
        for member in outer.getmembers():
            content = outer.extractfile(member) if member.isfile() else None
            if content is None:
                continue
            try:
                with tarfile.open(fileobj=io.BytesIO(content.read()), mode="r:*") as layer:
                    found = layer.extractfile(_MEMBER)
                    if found is not None:
                        return found.read().decode("utf-8")
            except (tarfile.TarError, KeyError):
                continue
    return None
