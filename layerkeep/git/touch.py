"""Give every tracked file the time of the commit that last changed it.

A fresh clone stamps every file with the checkout time, so a build cache keyed on mtimes
(and any tool comparing them) sees everything as new. `touch` sets each file's mtime to the
time of the commit that `git log -1 -- FILE` names, in one pass over history.

How one pass works: until a file is dated, git's default history simplification walks a
single chain for it (a merge that is TREESAME to a parent follows only the first such
parent). So we keep, for each commit, the files whose chain has reached it, visit commits
children first (`git log --topo-order`) and at each one either date a file there or hand
it on to the one parent its chain continues through. Three git processes answer:
- `git log --topo-order` lists the commits and their parents and times;
- `git log --first-parent --raw` streams the diffs along HEAD's first-parent chain (most of
  the work on a long history), read ahead by a thread while the topological sort runs;
- one `git diff-tree --stdin` gives the diffs of commits off that chain, and for merges the
  files that differ from every parent (`-c`).
All stop as soon as every file has a date.
"""

from __future__ import annotations

import os
import queue
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from layerkeep.core.errors import GitError

_GITLINK = 0o160000
_CHUNK = 1 << 20
# How every git process starts. `--no-optional-locks`: `git status` refreshes the stat data
# the index holds (stale once touch has set the mtimes) and writes the index back, and with
# .git in a build context a rewritten .git/index makes `COPY .` miss; so nothing here
# writes .git. The config would change what these plumbing-style invocations print.
_GIT = ("git", "--no-optional-locks", "-c", "log.showSignature=false", "-c", "log.showRoot=false")


@dataclass(frozen=True)
class TouchReport:
    """What `touch` did."""

    touched: int
    """Files (and symlinks) whose mtime was set."""
    skipped_dirty: tuple[str, ...]
    """Tracked files modified, staged or deleted in the work tree: left alone."""
    shallow: bool
    """A shallow clone: files last changed before the boundary got the boundary's time."""
    commits_read: int
    """Commits read from history before every file was dated."""
    seconds: float


def last_change_times(repo: Path, *, author_time: bool = False) -> dict[str, int]:
    """Map each path tracked at HEAD to the unix time of the commit that last changed it.

    Paths are relative to the top of the work tree holding `repo`, as git names them.
    The time is the committer time, or the author time with `author_time`.
    """
    top, head = _work_tree(repo)
    times, _ = _change_times(top, head, _head_modes(top, head), author_time=author_time)
    return {os.fsdecode(path): when for path, when in times.items()}


def touch(repo: Path, *, author_time: bool = False) -> TouchReport:
    """Set the mtime of every clean tracked file to the time of its last change."""
    started = time.monotonic()
    top, head = _work_tree(repo)
    modes = _head_modes(top, head)
    dirty = _dirty_paths(top)
    times, commits_read = _change_times(top, head, modes, author_time=author_time)
    root = os.fsencode(top) + b"/"
    touched = 0
    for path, when in times.items():
        if path in dirty or modes[path] == _GITLINK:
            continue
        ns = when * 1_000_000_000
        try:
            os.utime(root + path, ns=(ns, ns), follow_symlinks=False)
        except FileNotFoundError:
            # Not checked out (sparse checkout, skip-worktree): nothing to date.
            continue
        touched += 1
    return TouchReport(
        touched=touched,
        skipped_dirty=tuple(sorted(os.fsdecode(path) for path in dirty if path in modes)),
        shallow=_git(top, "rev-parse", "--is-shallow-repository").strip() == b"true",
        commits_read=commits_read,
        seconds=time.monotonic() - started,
    )


def _git(top: Path, *args: str) -> bytes:
    """Run one short git command in `top` and return its output."""
    try:
        done = subprocess.run(
            [*_GIT, *args], cwd=top, capture_output=True, check=False
        )
    except FileNotFoundError as error:
        raise GitError("git is not installed", hint="install git and put it on PATH") from error
    if done.returncode != 0:
        raise GitError(f"git {args[0]} failed in {top}: {_last_line(done.stderr)}")
    return done.stdout


def _last_line(stderr: bytes) -> str:
    lines = stderr.decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "no message"


def _work_tree(repo: Path) -> tuple[Path, bytes]:
    """The top of the work tree holding `repo` and its HEAD commit (resolved once, so that
    every git process reads the same history); GitError if there is none."""
    if not repo.is_dir():
        raise GitError(f"{repo} is not a folder")
    try:
        done = subprocess.run(
            [*_GIT, "rev-parse", "--show-toplevel"], cwd=repo, capture_output=True, check=False
        )
    except FileNotFoundError as error:
        raise GitError("git is not installed", hint="install git and put it on PATH") from error
    top = os.fsdecode(done.stdout.rstrip(b"\n"))
    if done.returncode != 0 or not top:
        raise GitError(
            f"{repo} is not inside a git work tree", hint="run it in a checkout of your project"
        )
    head = subprocess.run(
        [*_GIT, "rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
        cwd=top,
        capture_output=True,
        check=False,
    )
    if head.returncode != 0:
        raise GitError(f"the repository in {top} has no commits yet", hint="commit something first")
    return Path(top), head.stdout.strip()


def _head_modes(top: Path, head: bytes) -> dict[bytes, int]:
    """Every path tracked at HEAD with its mode."""
    modes: dict[bytes, int] = {}
    for record in _git(top, "ls-tree", "-r", "-z", "--full-tree", head.decode()).split(b"\0"):
        if record:
            meta, _, path = record.partition(b"\t")
            modes[path] = int(meta.split(b" ", 1)[0], 8)
    return modes


def _dirty_paths(top: Path) -> set[bytes]:
    """Tracked paths whose work tree or index copy differs from HEAD."""
    out = _git(
        top, "status", "--porcelain=v1", "-z", "--untracked-files=no", "--no-renames",
        "--ignore-submodules=all",
    )  # fmt: skip
    return {record[3:] for record in out.split(b"\0") if record}


def _change_times(
    top: Path, head: bytes, paths: Collection[bytes], *, author_time: bool
) -> tuple[dict[bytes, int], int]:
    """Date every path in `paths`; returns the dates and how many commits were read."""
    if not paths:
        return {}, 0
    with (
        _Commits(top, head) as commits,
        _FirstParentDiffs(top, head) as chain,
        _DiffTree(top) as diffs,
    ):
        times, read = _walk(head, paths, commits, chain, diffs, author_time=author_time)
        if len(times) < len(paths):
            for process in (commits, chain, diffs):
                process.check()
            raise GitError(f"git history in {top} ended with tracked files left undated")
        return times, read


def _walk(
    head: bytes,
    paths: Collection[bytes],
    commits: _Commits,
    chain: _FirstParentDiffs,
    diffs: _DiffTree,
    *,
    author_time: bool,
) -> tuple[dict[bytes, int], int]:
    times: dict[bytes, int] = {}
    remaining = len(paths)
    # pending[commit]: files whose simplified history has reached that commit undated.
    pending: dict[bytes, set[bytes]] = {head: set(paths)}

    def hand_on(commit: bytes, files: set[bytes]) -> None:
        there = pending.get(commit)
        if there is None:
            pending[commit] = files
        elif len(there) >= len(files):
            there |= files
        else:
            files |= there
            pending[commit] = files

    read = 0
    for commit, parents, committed, authored in commits:
        read += 1
        # Called for every commit, so that the first-parent stream keeps pace.
        changed = chain.changes(commit)
        files = pending.pop(commit, None)
        if not files:
            continue
        if not parents:
            dated = list(files)  # a root: every file it still holds began here
        else:
            if changed is None:
                changed = diffs.changed(commit, parents[:1])
            dated = [path for path in changed if path in files]
            if dated:
                files.difference_update(dated)
                if len(parents) > 1:
                    dated = _settle_merge(commit, parents, dated, diffs, hand_on)
            if files:
                hand_on(parents[0], files)
        when = int(authored if author_time else committed)
        for path in dated:
            times[path] = when
        remaining -= len(dated)
        if not remaining:
            break
    return times, read


def _settle_merge(
    commit: bytes,
    parents: list[bytes],
    changed: list[bytes],
    diffs: _DiffTree,
    hand_on: Callable[[bytes, set[bytes]], None],
) -> list[bytes]:
    """Of files a merge changed against its first parent, return those it changed itself.

    A file that differs from every parent changed in the merge; any other one follows the
    first of the other parents that holds the very same entry.
    """
    everywhere = set(diffs.changed(commit, parents))
    rest = [path for path in changed if path not in everywhere]
    for parent in parents[1:]:
        if not rest:
            break
        if len(parents) == 2:
            hand_on(parent, set(rest))
            rest = []
        else:
            differs = set(diffs.changed(commit, [parent]))
            hand_on(parent, {path for path in rest if path not in differs})
            rest = [path for path in rest if path in differs]
    if rest:
        raise GitError(f"git diff-tree gave inconsistent answers for merge {commit.decode()}")
    return [path for path in changed if path in everywhere]


class _Git:
    """A long-running git process read as a stream; killed when no longer needed."""

    def __init__(self, top: Path, args: list[str], *, stdin: bool = False) -> None:
        self.args = args
        # Lives as long as the process; a file, not a pipe, so git never blocks on it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [*_GIT, *args],
                cwd=top,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
            )
        except FileNotFoundError as error:
            self._stderr.close()
            raise GitError("git is not installed", hint="install git and put it on PATH") from error
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.stop()
        for stream in (self.proc.stdin, self.proc.stdout, self._stderr):
            if stream is not None:
                stream.close()

    def stop(self) -> None:
        """End the process (killed if still running), keeping what it wrote to stderr."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def check(self) -> None:
        """Raise GitError if the process ended in failure."""
        if self.proc.poll() not in (None, 0):
            self._stderr.seek(0)
            raise GitError(f"git {self.args[0]} failed: {_last_line(self._stderr.read())}")


class _Commits(_Git):
    """Every commit reachable from HEAD, children before parents."""

    def __init__(self, top: Path, head: bytes) -> None:
        log = ["log", "--topo-order", "--format=%H %P %ct %at", head.decode(), "--"]
        super().__init__(top, log)

    def __iter__(self) -> Iterator[tuple[bytes, list[bytes], bytes, bytes]]:
        """(commit, parents, committer time, author time) for each commit."""
        for line in self.stdout:
            fields = line.split()
            yield fields[0], fields[1:-2], fields[-2], fields[-1]


class _FirstParentDiffs(_Git):
    """Raw diffs along HEAD's first-parent chain, where most of the work is.

    A thread reads git's output into memory, so that git computes these diffs while the
    topological order is still being prepared instead of stalling on a full pipe.
    """

    def __init__(self, top: Path, head: bytes) -> None:
        super().__init__(
            top,
            [
                "log", "--first-parent", "--no-renames", "--raw", "-z", "--no-abbrev",
                "--no-color", "--diff-merges=first-parent", "--format=%H", head.decode(), "--",
            ],
        )  # fmt: skip
        self._chunks: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._tokens = self._nul_records()
        self._next: bytes | None = next(self._tokens, None)

    def _read(self) -> None:
        fd = self.stdout.fileno()
        try:
            while chunk := os.read(fd, _CHUNK):
                self._chunks.put(chunk)
        finally:
            self._chunks.put(b"")

    def _nul_records(self) -> Iterator[bytes]:
        rest = b""
        while chunk := self._chunks.get():
            records = (rest + chunk).split(b"\0")
            rest = records.pop()
            yield from records
        if rest:
            yield rest

    def changes(self, commit: bytes) -> list[bytes] | None:
        """Paths `commit` changes against its first parent, when it is the next commit of
        the chain (commits come children first, so the chain comes in order); else None."""
        if commit != self._next:
            return None
        # A ":<modes> <oids> <status>" record, then the path; the first one follows the
        # newline that ends the format line. The next commit's "%H" ends the list.
        paths: list[bytes] = []
        record = next(self._tokens, None)
        while record is not None and record[:1] in (b":", b"\n"):
            paths.append(next(self._tokens))
            record = next(self._tokens, None)
        self._next = record
        return paths

    def close(self) -> None:
        # The reader must see end of file before its pipe is closed under it.
        self.stop()
        self._reader.join()
        super().close()


class _DiffTree:
    """One `git diff-tree --stdin`, asked about commits off the first-parent chain and
    about merges; started on first use (a linear history never needs it)."""

    _END = b"-\n"  # not an object name: diff-tree echoes it, which marks an answer's end

    def __init__(self, top: Path) -> None:
        self._top = top
        self._git: _Git | None = None
        self._buffer = b""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        if self._git is not None:
            self._git.close()

    def check(self) -> None:
        if self._git is not None:
            self._git.check()

    def changed(self, commit: bytes, parents: list[bytes]) -> list[bytes]:
        """Paths where `commit` differs from each of `parents` (for one parent, a diff)."""
        if self._git is None:
            args = ["diff-tree", "--stdin", "-r", "-z", "-c", "--no-renames", "--no-commit-id"]
            self._git = _Git(self._top, [*args, "--raw"], stdin=True)
        git = self._git
        assert git.proc.stdin is not None
        git.proc.stdin.write(b" ".join([commit, *parents]) + b"\n" + self._END)
        git.proc.stdin.flush()
        paths: list[bytes] = []
        buffer, at = self._buffer, 0
        while not buffer.startswith(self._END, at):
            # ":<modes> <oids> <status>\0<path>\0" (two colons for a combined diff)
            record_end = buffer.find(b"\0", at)
            path_end = buffer.find(b"\0", record_end + 1) if record_end >= 0 else -1
            if path_end < 0 or len(buffer) - at < len(self._END):
                more = os.read(git.stdout.fileno(), _CHUNK)
                if not more:
                    git.proc.wait()
                    git.check()
                    raise GitError("git diff-tree stopped answering")
                buffer, at = buffer[at:] + more, 0
                continue
            paths.append(buffer[record_end + 1 : path_end])
            at = path_end + 1
        self._buffer = buffer[at + len(self._END) :]
        return paths
