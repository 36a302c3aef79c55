"""Say why a build missed the cache, from a record of what each step read.

After a build, ``explain_misses`` takes, per stage, the first step the builder did not
reuse, and compares that stage with the record of the build that made the cached
images (building.build_records): each instruction's text, the id its base image
resolves to, the build args it sees and the context files each COPY/ADD reads
(building.step_inputs). The first difference at or before the missed step is the
reason. Then it records this build, keyed by the images it made, so that the next
build (on a fresh machine too) finds the record of the build its restored images came
from.
"""

from __future__ import annotations

import difflib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Self

from layerkeep.building.build_records import BuildRecord, Maker, keep_record, kept_records
from layerkeep.building.output import StepTally
from layerkeep.building.step_inputs import (
    ContextFiles,
    Identity,
    StageInputs,
    Step,
    engine_lookup,
    read_inputs,
)
from layerkeep.core.engine import Engine
from layerkeep.core.log import Log
from layerkeep.core.settings import Settings

_SHOWN = 3  # paths named in a line before "and N more"
_TEXT = 80  # characters of an instruction shown
_VERTEX = {"RUN", "COPY", "ADD", "WORKDIR"}  # the instructions BuildKit numbers as steps



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
    stages = read_inputs(dockerfile, settings.build_args, lookup=lookup, files=files)
    maker = Maker(str(engine.server_version().get("Version", "")), builder)
    cached = {image: found for image, found in before.items() if found}
    missed = first_misses(tally, builder, stages)
    if not missed:
        lines: list[MissLine] = []
    elif not (cached or imported_export):
        lines = [MissLine("cache miss: no cached image to compare with (cold build)")]
    else:
        # An imported export was made by the newest build on record of these images.
        old = last if imported_export else next((r for r in records if r.made_any(cached)), None)
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
    keep_record(engine, settings, record, records, log=log)
    return tuple(lines)


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


def _short(text: str) -> str:
    return f"`{text}`" if len(text) <= _TEXT else f"`{text[: _TEXT - 3]}...`"


def _id(image_id: str | None) -> str:
    return (image_id or "nothing")[:19]

