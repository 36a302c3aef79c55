"""Keep layerkeep's own files out of the build context, without touching the user's files.

layerkeep writes its cache (LAYERKEEP_CACHE_DIR), the JUnit reports (LAYERKEEP_REPORTS_DIR)
and temporary files (TMPDIR). By default the first two are inside the project, which is
often the build context itself (``COPY . /app``): sent to the builder, they change the
context on every run (every step after ``COPY .`` rebuilds) and end up in the image (a
copy of the last cache inside the next one). So every build leaves them out:

- the classic builder gets a context tar made with the user's ``.dockerignore`` rules and
  then these paths (``Engine.build(exclude=...)``);
- BuildKit gets a temporary copy of the Dockerfile with a ``<name>.dockerignore`` beside it
  holding the user's rules and then these paths: the Dockerfile-specific ignore file that
  the 20.10 CLI and buildx both read instead of the context's ``.dockerignore``. The
  context stays the user's folder, so transfers stay incremental and cache keys do not
  change.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from layerkeep.building.dockerfile import parse_dockerfile
from layerkeep.core.settings import Settings

IGNORE_SUFFIX = ".dockerignore"


@dataclass(frozen=True)
class Output:
    """A folder layerkeep writes into, the setting that places it, and a sound value."""

    key: str
    path: Path
    example: str

    def pattern(self, context: Path) -> str | None:
        """Its ignore pattern when it lies strictly inside ``context`` (resolved)."""
        inside = _relative(self.path.resolve(), context)
        if inside is None or inside == Path():
            return None
        # A leading "/" keeps a name starting with "#" or "!" from reading as a comment
        # or an exception; both matchers drop it.
        return f"/{inside.as_posix()}"


def outputs(settings: Settings) -> list[Output]:
    """Every folder layerkeep writes during a run."""
    found = [Output("LAYERKEEP_REPORTS_DIR", settings.reports_dir, "reports")]
    if settings.cache_backend == "dir":
        found.insert(0, Output("LAYERKEEP_CACHE_DIR", settings.cache_dir, ".layerkeep-cache"))
    # The example is only shown in a message; nothing is written there.
    found.append(Output("TMPDIR", Path(tempfile.gettempdir()), "/var/tmp"))  # noqa: S108
    return found


def context_excludes(settings: Settings) -> tuple[str, ...]:
    """Ignore patterns, relative to the context, for each output folder inside it."""
    context = settings.context.resolve()
    patterns = (output.pattern(context) for output in outputs(settings))
    return tuple(dict.fromkeys(pattern for pattern in patterns if pattern))


def preflight_context(settings: Settings) -> list[str]:
    """One line per output that would reach the build context, with the fix."""
    context = settings.context.resolve()
    problems: list[str] = []
    for output in outputs(settings):
        # Inside the context is excluded, outside or above it is never sent; only the
        # context itself cannot be left out.
        if output.path.resolve() == context:
            problems.append(
                f"{output.key}={output.path} is the build context {context}, so "
                f"layerkeep's files would be built into the image: set {output.key} to a "
                f"folder of its own, e.g. {output.key}={output.example}"
            )
    problems += _copied_outputs(settings, context)
    return problems


def _copied_outputs(settings: Settings, context: Path) -> list[str]:
    """Outputs the Dockerfile names in COPY/ADD: excluding them would break the build."""
    dockerfile = context / settings.dockerfile
    try:
        parsed = parse_dockerfile(dockerfile.read_text(encoding="utf-8"))
    except OSError:
        return []  # plan_build reports an unreadable Dockerfile
    excluded = {
        pattern.lstrip("/"): output
        for output in outputs(settings)
        if (pattern := output.pattern(context))
    }
    problems: list[str] = []
    sources = [
        source
        for stage in parsed.stages
        for instruction in stage.instructions
        if instruction.flag("from") is None  # a COPY --from reads a stage or an image
        for source in instruction.sources()
    ]
    for source in sources:
        clean = Path(os.path.normpath(source)).as_posix()
        for folder, output in excluded.items():
            if clean == folder or clean.startswith(f"{folder}/"):
                problems.append(
                    f"{dockerfile.name} copies {source} from {output.key}={output.path}, "
                    "which layerkeep keeps out of the build context: point "
                    f"{output.key} elsewhere, or copy the files from another folder"
                )
    return problems


def ignore_file(context: Path, dockerfile: Path, builder: str) -> Path:
    """The ignore file the builder reads (it may not exist): BuildKit reads
    ``<Dockerfile>.dockerignore`` when there is one, the classic builder only the
    context's ``.dockerignore``."""
    own = dockerfile.with_name(dockerfile.name + IGNORE_SUFFIX)
    return own if builder == "buildkit" and own.is_file() else context / ".dockerignore"


@contextmanager
def dockerfile_with_excludes(
    dockerfile: Path, context: Path, excludes: tuple[str, ...]
) -> Iterator[Path]:
    """A temporary copy of ``dockerfile`` whose own ignore file adds ``excludes``.

    The user's rules come first, from where BuildKit would read them: the Dockerfile's
    own ``<name>.dockerignore`` if there is one, else the context's ``.dockerignore``.
    Later patterns win, so the user cannot re-include layerkeep's files by accident.
    """
    rules = ignore_file(context, dockerfile, "buildkit")
    text = rules.read_text(encoding="utf-8") if rules.is_file() else ""
    with tempfile.TemporaryDirectory(prefix="layerkeep-dockerfile-") as folder:
        copy = Path(folder) / dockerfile.name
        shutil.copyfile(dockerfile, copy)
        header = "\n# added by layerkeep: its cache, reports and temporary files\n"
        (Path(folder) / (dockerfile.name + IGNORE_SUFFIX)).write_text(
            text + header + "".join(f"{pattern}\n" for pattern in excludes), encoding="utf-8"
        )
        yield copy


def _relative(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` when it is inside it (or is it), else None."""
    try:
        return path.relative_to(folder)
    except ValueError:
        return None
