"""Which node this is, which test files there are, and each node's share of them.

A CI job split over parallel nodes (CircleCI ``parallelism``, GitLab ``parallel``, a
GitHub Actions matrix with LAYERKEEP_NODE_INDEX/LAYERKEEP_NODE_TOTAL) runs the same
command on every node, which must then pick the same shares without talking to the
others: the split depends only on the files LAYERKEEP_TEST_FILES matches, their sizes
and the timing history, and is greedy longest-processing-time (the slowest file first,
ties by path, each to the node with the least time so far, ties to the one with the
fewest files, then the lowest number), so that every node computes the same shares and
no file runs twice or not at all. A CI node splits by the timings measured before its
commit (see :mod:`.timings`), which its sibling nodes do not change while it runs.

Files are named as the test command sees them: a file under a LAYERKEEP_TEST_MOUNTS
source by its path in the container, any other by its path in the build context (where
``COPY . .`` puts it), both relative to the test working directory when under it.
"""

from __future__ import annotations

import heapq
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from layerkeep.core.errors import ConfigError
from layerkeep.core.log import Log
from layerkeep.core.settings import Settings
from layerkeep.testrun.timings import FileTime, History, history_digest, latest

PLACEHOLDER = "{files}"


@dataclass(frozen=True, order=True)
class Node:
    """One of the nodes the tests are split over, numbered from 1."""

    index: int
    total: int

    def __str__(self) -> str:
        return f"node {self.index}/{self.total}"


@dataclass(frozen=True)
class TestFile:
    """A test file: its path as the test command sees it, and its size on the host."""

    path: str
    size: int


@dataclass(frozen=True)
class Plan:
    """The nodes this machine runs and their files; ``shares`` is None when the tests are
    not split (no LAYERKEEP_TEST_FILES): one node runs the command as written."""

    nodes: tuple[Node, ...]
    shares: Mapping[Node, tuple[str, ...]] | None
    files: tuple[TestFile, ...] = ()
    # What the split was balanced by, for the log: "timings of 11/12 files (3f2a9c01)".
    basis: str = ""

    def describe(self, node: Node) -> str:
        """``node 2/4: 3 of 11 files, by timings of 11/11 files (3f2a9c01)``."""
        files = self.shares[node] if self.shares is not None else ()
        return f"{node}: {len(files)} of {len(self.files)} files, by {self.basis}"


def current_node(settings: Settings) -> Node:
    """This CI node (LAYERKEEP_NODE_INDEX/_TOTAL, else the CI's variables), checked."""
    index, total = settings.node_index, settings.node_total
    if index > total:
        where = settings.origins.get("LAYERKEEP_NODE_INDEX", "default")
        raise ConfigError(
            f"LAYERKEEP_NODE_INDEX={index} (from {where}) is more than "
            f"LAYERKEEP_NODE_TOTAL={total}",
            key="LAYERKEEP_NODE_INDEX",
            hint="nodes are numbered from 1 to LAYERKEEP_NODE_TOTAL",
        )
    return Node(index, total)


def plan_tests(
    settings: Settings, history: History | None, *, log: Log, commit_time: float | None = None
) -> Plan:
    """The nodes to run here and each one's files.

    In a split CI job, this node and its share; with LAYERKEEP_TEST_NODES (``--nodes``)
    every node, to run at once. ``history`` is the timing history (None when it could
    not be read: a CI node then runs every file, since it cannot know what the others
    chose). A CI node uses only timings measured for other commits before
    ``commit_time`` (LAYERKEEP_COMMIT's), never those its sibling nodes save meanwhile.
    """
    ci, local = current_node(settings), settings.test_nodes
    if ci.total > 1 and local > 1:
        raise ConfigError(
            f"LAYERKEEP_TEST_NODES={local} runs test nodes on this machine, and this job is "
            f"already {ci} of a parallel CI job",
            key="LAYERKEEP_TEST_NODES",
            hint="use one of them: LAYERKEEP_TEST_NODES=1 in CI, or LAYERKEEP_NODE_TOTAL=1",
        )
    if not settings.test_files:
        return _unsplit(settings, ci, local, log)
    files = find_test_files(settings)
    if ci.total > 1 and history is None:
        log(f"warning: {ci} cannot tell which files the other nodes run without the test "
            "timings: it runs every file, so that none is left out")
        every = tuple(f.path for f in files)
        return Plan((ci,), {ci: every}, files, "no split (the test timings are unreadable)")
    if ci.total > 1:
        times = latest(history or {}, commit=settings.commit, before=commit_time)
    else:
        times = latest(history or {})
    weights, basis = file_weights(files, times)
    nodes = (ci,) if ci.total > 1 else tuple(Node(k, local) for k in range(1, local + 1))
    shares = split_files(weights, nodes[0].total)
    chosen = {node: shares[node.index - 1] for node in nodes}
    return Plan(nodes, chosen, files, basis)


def _unsplit(settings: Settings, ci: Node, local: int, log: Log) -> Plan:
    if local > 1:
        raise ConfigError(
            f"LAYERKEEP_TEST_NODES={local} needs LAYERKEEP_TEST_FILES, the files to split",
            key="LAYERKEEP_TEST_FILES",
            hint="e.g. LAYERKEEP_TEST_FILES=tests/**/test_*.py, globs relative to the project",
        )
    if PLACEHOLDER in settings.test_command:
        raise ConfigError(
            f"LAYERKEEP_TEST_COMMAND has {PLACEHOLDER} but LAYERKEEP_TEST_FILES is empty",
            key="LAYERKEEP_TEST_FILES",
            hint="set LAYERKEEP_TEST_FILES to the test files' globs, e.g. tests/**/test_*.py",
        )
    if ci.total > 1:
        log(f"warning: this job is {ci} of a parallel CI job, but LAYERKEEP_TEST_FILES is "
            "not set: this node runs every test (set it to split them between the nodes)")
    return Plan((Node(1, 1),), None)


def find_test_files(settings: Settings) -> tuple[TestFile, ...]:
    """The files LAYERKEEP_TEST_FILES matches, by their path in the container, sorted."""
    found: dict[str, TestFile] = {}
    for pattern in settings.test_files:
        if PurePosixPath(pattern).is_absolute():
            raise ConfigError(
                f"LAYERKEEP_TEST_FILES: {pattern!r} is an absolute path",
                key="LAYERKEEP_TEST_FILES",
                hint="write globs relative to the project folder, e.g. tests/**/test_*.py",
            )
        for host in settings.project_dir.glob(pattern):
            if host.is_file():
                path = container_path(settings, host)
                found[path] = TestFile(path, host.stat().st_size)
    if not found:
        raise ConfigError(
            f"LAYERKEEP_TEST_FILES={','.join(settings.test_files)} matches no file in "
            f"{settings.project_dir}",
            key="LAYERKEEP_TEST_FILES",
            hint="globs are relative to the project folder, e.g. tests/**/test_*.py",
        )
    return tuple(found[path] for path in sorted(found))


def container_path(settings: Settings, host: Path) -> str:
    """Where the test command finds the host file ``host`` (see the module's notes)."""
    absolute = host.resolve()
    path: PurePosixPath | None = None
    for mount in sorted(settings.test_mounts, key=lambda m: -len(str(m.source))):
        source = mount.source.resolve()
        if absolute.is_relative_to(source):
            path = PurePosixPath(mount.target, absolute.relative_to(source).as_posix())
            break
    if path is None:
        bases = [settings.context.resolve(), settings.project_dir.resolve()]
        base = next((base for base in bases if absolute.is_relative_to(base)), None)
        if base is None:
            raise ConfigError(
                f"LAYERKEEP_TEST_FILES: {host} is outside the project and every test mount",
                key="LAYERKEEP_TEST_FILES",
                hint="match files in the project, or mount their folder with LAYERKEEP_TEST_MOUNTS",
            )
        path = PurePosixPath(absolute.relative_to(base).as_posix())
    workdir = PurePosixPath(settings.test_workdir or "/")
    if path.is_absolute() and settings.test_workdir and path.is_relative_to(workdir):
        path = path.relative_to(workdir)
    return str(path)


def file_weights(
    files: Sequence[TestFile], history: Mapping[str, FileTime]
) -> tuple[dict[str, float], str]:
    """Each file's expected seconds, and what they came from.

    A file without a timing gets its size times the seconds per byte of the files with
    one; with no timing at all, sizes alone weigh the files.
    """
    known = {f.path: history[f.path].seconds for f in files if f.path in history}
    if not known:
        return {f.path: float(f.size) for f in files}, "file sizes (no test timings yet)"
    known_bytes = sum(f.size for f in files if f.path in known)
    per_byte = sum(known.values()) / known_bytes if known_bytes else 0.0
    mean = sum(known.values()) / len(known)
    weights = {
        f.path: known[f.path] if f.path in known else (f.size * per_byte or mean) for f in files
    }
    digest = history_digest({name: history[name] for name in known})
    return weights, f"timings of {len(known)}/{len(files)} files ({digest})"


def split_files(weights: Mapping[str, float], count: int) -> list[tuple[str, ...]]:
    """``count`` shares of the files, balanced by weight: greedy longest-processing-time.

    The heaviest file goes first, each to the share with the least weight so far (then
    the fewest files, then the lowest number), so equal inputs give equal shares on
    every machine. Each share is sorted by path.
    """
    shares: list[list[str]] = [[] for _ in range(count)]
    loads = [(0.0, 0, number) for number in range(count)]
    for path in sorted(weights, key=lambda name: (-weights[name], name)):
        load, files, number = heapq.heappop(loads)
        shares[number].append(path)
        heapq.heappush(loads, (load + weights[path], files + 1, number))
    return [tuple(sorted(share)) for share in shares]


def share_command(command: str, files: Sequence[str]) -> str:
    """The test command for a share: the files (shell-quoted) in place of ``{files}``, or
    after the command when it has none."""
    quoted = " ".join(shlex.quote(path) for path in files)
    if PLACEHOLDER in command:
        return command.replace(PLACEHOLDER, quoted)
    return f"{command} {quoted}"
