"""How long each test file took: summed from JUnit reports, kept as a history.

A test file is named as the test command sees it (``tests/test_links.py``, see
:mod:`~layerkeep.testrun.split`). A JUnit ``<testcase>`` names its file with a ``file``
attribute (pytest's xunit1, many other runners), else only by its ``classname``
(``tests.test_links.TestCreate``: pytest's default xunit2, Django, unittest-xml): either
is matched against the files that ran, by their longest unambiguous tail, so a file the
report names from another root (``/app/tests/...`` or ``tests/...``) is still found.

The history keeps each file's last few measurements (seconds, when, for which commit),
one per commit, newest first; histories from several nodes or runs merge into one. A
split CI node uses each file's newest measurement made for another commit before this
commit's time (:func:`latest`): what its sibling nodes write while it runs changes
nothing it reads, so every node of a run splits from the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from layerkeep.core.log import Log

FORMAT = "layerkeep-test-timings/1"


# Measurements kept per file: enough that one older than a run of the same branch
# going on at the same time is still there.
KEEP = 5


@dataclass(frozen=True)
class FileTime:
    """A test file's seconds, measured at ``at`` (Unix time) for ``commit``."""

    seconds: float
    at: float
    commit: str = ""


# Each file's measurements, newest first, one per commit, at most KEEP.
History = Mapping[str, tuple[FileTime, ...]]


def file_seconds(reports: Iterable[Path], files: Collection[str], *, log: Log) -> dict[str, float]:
    """Seconds per file of ``files``: the sum of its testcases' times in ``reports``.

    A file no testcase names is left out (its time is unknown, not zero), as is a
    report that cannot be read (a warning).
    """
    by_path, by_module = _tails(files)
    seconds: dict[str, float] = {}
    for report in reports:
        try:
            # The project's own test run wrote it on this machine: not untrusted input.
            root = ET.parse(report).getroot()  # noqa: S314
        except (ET.ParseError, OSError) as error:
            log(f"warning: {report.name} not read for test timings: {error}")
            continue
        for case in root.iter("testcase"):
            found = _case_file(case, by_path, by_module)
            if found is not None:
                seconds[found] = seconds.get(found, 0.0) + _time(case)
    return seconds


def _tails(files: Collection[str]) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Each file under every tail of its path (``a/b/c.py``, ``b/c.py``, ``c.py``) and
    of its dotted module name (``a.b.c``, ``b.c``, ``c``)."""
    by_path: dict[str, set[str]] = {}
    by_module: dict[str, set[str]] = {}
    for name in files:
        parts = PurePosixPath(name).parts
        parts = parts[1:] if parts and parts[0] == "/" else parts
        module = [*parts[:-1], PurePosixPath(parts[-1]).stem] if parts else []
        for start in range(len(parts)):
            by_path.setdefault("/".join(parts[start:]), set()).add(name)
            by_module.setdefault(".".join(module[start:]), set()).add(name)
    return by_path, by_module


def _case_file(
    case: ET.Element, by_path: Mapping[str, set[str]], by_module: Mapping[str, set[str]]
) -> str | None:
    """The file a testcase belongs to: the longest tail of its ``file`` (else of its
    ``classname``'s leading names) that names exactly one file."""
    given = case.get("file", "").strip()
    if given:
        parts = [part for part in PurePosixPath(given).parts if part not in ("/", ".")]
        candidates = ["/".join(parts[start:]) for start in range(len(parts))]
        table = by_path
    else:
        names = case.get("classname", "").split(".")
        candidates = [".".join(names[:end]) for end in range(len(names), 0, -1)]
        table = by_module
    for candidate in candidates:
        matches = table.get(candidate, set())
        if len(matches) == 1:
            return next(iter(matches))
    return None


def _time(case: ET.Element) -> float:
    try:
        value = float(case.get("time", "0") or 0)
    except ValueError:
        return 0.0
    return value if value >= 0 and value != float("inf") else 0.0


def measured(
    seconds: Mapping[str, float], at: float, commit: str
) -> dict[str, tuple[FileTime, ...]]:
    """This run's seconds as a history: measured at ``at`` for ``commit``."""
    return {name: (FileTime(round(value, 3), at, commit),) for name, value in seconds.items()}


def merge(*histories: History) -> dict[str, tuple[FileTime, ...]]:
    """One history: for each file, the newest measurement of each commit (the longer one
    on a tie), the KEEP newest."""
    by_commit: dict[str, dict[str, FileTime]] = {}
    for history in histories:
        for name, entries in history.items():
            kept = by_commit.setdefault(name, {})
            for entry in entries:
                known = kept.get(entry.commit)
                if known is None or (entry.at, entry.seconds) > (known.at, known.seconds):
                    kept[entry.commit] = entry
    return {
        name: tuple(sorted(kept.values(), key=lambda e: (-e.at, -e.seconds, e.commit))[:KEEP])
        for name, kept in by_commit.items()
    }


def latest(
    history: History, *, commit: str | None = None, before: float | None = None
) -> dict[str, FileTime]:
    """Each file's newest measurement; with ``commit``, only one made for another commit,
    and with ``before``, only one made before that time (a file with none is left out)."""
    found = {}
    for name, entries in history.items():
        usable = [
            entry for entry in entries
            if (commit is None or entry.commit != commit)
            and (before is None or entry.at < before)
        ]
        if usable:
            found[name] = max(usable, key=lambda e: (e.at, e.seconds))
    return found


def history_text(history: History) -> str:
    """The history as the JSON document kept with the cache (sorted: same history, same text)."""
    files = {
        name: [{"seconds": e.seconds, "at": e.at, "commit": e.commit} for e in entries]
        for name, entries in sorted(history.items())
    }
    return json.dumps({"format": FORMAT, "files": files}, separators=(",", ":"), sort_keys=True)


def parse_history(text: str, *, where: str, log: Log) -> dict[str, tuple[FileTime, ...]] | None:
    """Read :func:`history_text`'s document; None (and a warning) when it is damaged."""
    try:
        document = json.loads(text)
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}")
        history = {}
        for name, entries in document["files"].items():
            parsed = tuple(
                FileTime(float(entry["seconds"]), float(entry["at"]), str(entry["commit"]))
                for entry in entries
            )
            if not isinstance(name, str) or not all(_plausible(entry) for entry in parsed):
                raise ValueError(f"entry {name!r}")
            history[name] = parsed
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        log(f"warning: ignored the damaged test timings in {where} ({error})")
        return None
    return merge(history)


def _plausible(entry: FileTime) -> bool:
    return 0 <= entry.seconds < float("inf") and entry.at < float("inf")


def history_digest(times: Mapping[str, FileTime]) -> str:
    """A short digest of the seconds a split used: every node of one run prints the same
    one when they split from the same numbers."""
    seconds = {name: entry.seconds for name, entry in sorted(times.items())}
    return hashlib.sha256(json.dumps(seconds).encode()).hexdigest()[:8]
