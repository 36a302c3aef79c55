"""Build records: what one build read and made, and where the records are kept.

A record lists, per stage, each step and what it read (building.step_inputs), the images
the build made (by id, and by content: ids differ between the classic image store and
the containerd store, so a cache crossing stores is matched by content), and the engine
version and builder that made them. building.explain compares the record of the build
that made the cached images with this build's inputs to say why a step missed.

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

import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from layerkeep.building.step_inputs import Identity, StageInputs, Step
from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.imageref import ImageRef, is_valid_tag
from layerkeep.core.log import Log
from layerkeep.core.settings import Settings

FORMAT = "layerkeep-build-record/1"
RECORDS_FILE = "build-records.json"
RECORD_TAG_SUFFIX = "-build-record"
RECORD_LABEL = "io.layerkeep.building-record"
_KEEP = 5  # records kept: a cache may hold images of a build older than the last one
_MEMBER = "layerkeep-build-records.json"


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


def keep_record(
    engine: Engine,
    settings: Settings,
    record: BuildRecord,
    records: Sequence[BuildRecord],
    *,
    log: Log,
) -> None:
    """Put ``record`` first among the kept ``records`` (replacing one of the same
    images), in the local record image; a failure only costs later explanations."""
    kept = [record, *(r for r in records if r.images != record.images)][:_KEEP]
    if kept == list(records[:_KEEP]):  # a build that changed nothing skips the image write
        return
    reference = record_image(settings)
    if reference is None:
        return
    try:
        _write_record_image(engine, reference, records_text(kept))
    except DockerOperationError as error:
        log(f"warning: build record not kept: {error.one_line()}")


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
