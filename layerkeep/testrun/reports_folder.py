"""The reports folder test.run writes into, which may hold the user's own files.

Only what layerkeep's previous run wrote is removed (``clear_previous_reports``, from
the list ``record_reports`` keeps in ``.layerkeep-reports.json``). The test container
writes a folder of its own (``container_outbox``: 0777, inside a 0700 folder of
layerkeep's), and ``move_reports`` moves the regular files it wrote into the reports
folder, whose permissions stay as they are.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

from layerkeep.core.atomic import atomic_write
from layerkeep.core.log import Log

MANIFEST = ".layerkeep-reports.json"
# The private folder the test container's own folder lives in while the tests run.
OUTBOX_PREFIX = ".layerkeep-tests-"


def clear_previous_reports(folder: Path) -> int:
    """Remove the files the manifest says layerkeep's previous run wrote; how many.

    Nothing else is touched: not the user's files, not a path outside ``folder``.
    """
    manifest = folder / MANIFEST
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8")).get("files", [])
    except FileNotFoundError:
        return 0
    except (OSError, ValueError, AttributeError):
        listed = []  # damaged: ours, so it goes, but it names nothing to remove
    inside = folder.resolve()
    removed = 0
    for name in listed if isinstance(listed, list) else []:
        if not isinstance(name, str):
            continue
        path = folder / name
        if not path.resolve().is_relative_to(inside) or not path.is_file():
            continue
        path.unlink()
        removed += 1
    manifest.unlink()
    return removed


def record_reports(folder: Path, written: Iterable[Path]) -> Path:
    """Write the manifest of the files this run wrote in ``folder`` (atomically)."""
    names = sorted(path.relative_to(folder).as_posix() for path in written)
    text = json.dumps({"written_by": "layerkeep test.run", "files": names}, indent=2) + "\n"
    target = folder / MANIFEST
    atomic_write(target, text.encode(), mode=0o644)
    return target


@contextlib.contextmanager
def container_outbox(reports: Path, log: Log) -> Iterator[Path]:
    """A folder the test container may write (0777), inside a private one (0700) of
    layerkeep's in ``reports``; removed afterwards with what is left in it."""
    private = Path(tempfile.mkdtemp(prefix=OUTBOX_PREFIX, dir=reports)).resolve()
    try:
        outbox = private / "reports"
        outbox.mkdir()
        outbox.chmod(0o777)  # ours, and only reachable through its private parent
        yield outbox
    finally:
        try:
            shutil.rmtree(private)
        except OSError as error:
            log(
                f"warning: could not remove {private} ({error.strerror or error}): the tests "
                "made folders there as another user; remove it as root"
            )


def move_reports(outbox: Path, reports: Path, log: Log, *, rename: str = "") -> list[Path]:
    """Move the regular files the tests wrote in ``outbox`` to the same place in
    ``reports``; the files moved, sorted. What cannot be moved is a warning.

    ``rename`` (``-node2``) goes into the name of what the tests wrote at the top of
    ``outbox``: ``junit.xml`` -> ``junit-node2.xml``, ``htmlcov/`` -> ``htmlcov-node2/``.
    """
    moved: list[Path] = []

    def unreadable(error: OSError) -> None:
        log(f"warning: reports in {error.filename} not read: {error.strerror or error}")

    for folder, _, names in os.walk(outbox, onerror=unreadable):
        for name in names:
            source = Path(folder) / name
            target = reports / _renamed(source.relative_to(outbox), rename)
            if not stat.S_ISREG(source.lstat().st_mode):
                log(f"warning: {target.relative_to(reports)} is not a regular file; left out")
                continue
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                _move(source, target)
            except OSError as error:
                log(f"warning: report {target} not written: {error.strerror or error}")
                continue
            moved.append(target)
    return sorted(moved)


def _renamed(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` before the extension of its first part."""
    if not suffix:
        return path
    first = PurePosixPath(path.parts[0])
    return Path(f"{first.stem}{suffix}{first.suffix}", *path.parts[1:])


def _move(source: Path, target: Path) -> None:
    try:
        source.replace(target)
    except PermissionError:
        # In a folder the container made as its own user: readable, not ours to empty.
        shutil.copyfile(source, target)
