"""Real git repositories for the gittouch tests and benchmark.

- `Scripted`: a repository built with ordinary git commands, one commit at a time, each
  with a known committer time (the author time is always 100_000 s earlier).
- `random_history`: a random DAG (branches, merges taking each file from a side or new
  content, octopus and `-s ours` merges, deletes, chmods, symlinks, extra roots, clock
  skew) written through `git fast-import`.
- `topic_history`: a long history shaped like git/git's (topic branches merged into a
  mainline, back-merges), for benchmarks.
- `oracle_times`: what `git log -1 -- FILE` says for each file, one git process per file.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

AUTHOR_LAG = 100_000
# Fixed identity, no user or system config: results must not depend on the machine.
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "A U Thor",
    "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "C O Mitter",
    "GIT_COMMITTER_EMAIL": "committer@example.com",
}

# A file as the generators model it: git mode and content (a symlink's content is its target).
Blob = tuple[str, bytes]
State = dict[str, Blob]


def git(
    repo: Path, *args: str, when: int | None = None, stdin: bytes | None = None, check: bool = True
) -> str:
    """Run git in `repo` with the fixed environment; `when` dates a commit it makes."""
    env = {**os.environ, **GIT_ENV}
    if when is not None:
        env["GIT_COMMITTER_DATE"] = f"@{when} +0000"
        env["GIT_AUTHOR_DATE"] = f"@{when - AUTHOR_LAG} +0000"
    done = subprocess.run(
        ["git", *args], cwd=repo, env=env, input=stdin, capture_output=True, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode(errors="surrogateescape")


def tracked_paths(repo: Path) -> list[str]:
    """Every path tracked at HEAD, exactly as git names it."""
    out = git(repo, "ls-tree", "-r", "-z", "--name-only", "--full-tree", "HEAD")
    return [path for path in out.split("\0") if path]


def oracle_times(
    repo: Path, paths: Iterable[str] | None = None, *, author_time: bool = False
) -> dict[str, int]:
    """The per-file loop: `git log -1 -- FILE` for each path (literal pathspecs)."""
    form = "--format=%at" if author_time else "--format=%ct"
    return {
        path: int(git(repo, "--literal-pathspecs", "log", "-1", form, "--", path))
        for path in (tracked_paths(repo) if paths is None else paths)
    }


class Scripted:
    """A repository built step by step with porcelain commands and known times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "-q", "-b", "main")

    def git(self, *args: str, when: int | None = None, check: bool = True) -> str:
        return git(self.path, *args, when=when, check=check)

    def write(self, name: str, content: str, *, executable: bool = False) -> None:
        file = self.path / name
        file.parent.mkdir(parents=True, exist_ok=True)
        if file.is_symlink():
            file.unlink()
        file.write_text(content, encoding="utf-8")
        file.chmod(0o755 if executable else 0o644)

    def symlink(self, name: str, target: str) -> None:
        link = self.path / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)

    def remove(self, name: str) -> None:
        self.git("rm", "-q", "--", name)

    def commit(self, message: str, *, when: int) -> str:
        """Commit everything in the work tree; returns the new commit."""
        self.git("add", "-A")
        self.git("commit", "-q", "--allow-empty", "-m", message, when=when)
        return self.head()

    def merge(
        self, *branches: str, when: int, strategy: str = "", resolve: Mapping[str, str] = {}
    ) -> str:
        """Merge `branches` into the current branch; `resolve` settles conflicts by content."""
        args = ["merge", "-q", "--no-ff", "--no-edit"]
        if strategy:
            args += ["-s", strategy]
        self.git(*args, *branches, when=when, check=not resolve)
        for name, content in resolve.items():
            self.write(name, content)
        if resolve:
            self.git("add", "-A")
            self.git("commit", "-q", "--no-edit", when=when)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").strip()


class _Importer:
    """Writes a `git fast-import` stream; a commit lists its changes from its first parent."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.marks = 0

    def commit(
        self,
        ref: str,
        parents: list[int],
        changes: Mapping[str, Blob | None],
        *,
        when: int,
        author_when: int,
    ) -> int:
        self.marks += 1
        message = f"commit {self.marks}\n".encode()
        out = [
            f"commit refs/heads/{ref}\nmark :{self.marks}\n"
            f"author A U Thor <author@example.com> {author_when} +0000\n"
            f"committer C O Mitter <committer@example.com> {when} +0000\n"
            f"data {len(message)}\n".encode(),
            message,
        ]
        if parents:
            out.append(f"from :{parents[0]}\n".encode())
        out.extend(f"merge :{parent}\n".encode() for parent in parents[1:])
        for path, blob in sorted(changes.items()):
            if blob is None:
                out.append(b"D " + _quote(path) + b"\n")
            else:
                mode, content = blob
                out.append(f"M {mode} inline ".encode() + _quote(path) + b"\n")
                out.append(f"data {len(content)}\n".encode() + content + b"\n")
        self.chunks.append(b"".join(out) + b"\n")
        return self.marks

    def run(self, repo: Path, head: str = "main") -> None:
        """Import into a new repository at `repo` and check out `head`."""
        repo.mkdir(parents=True, exist_ok=True)
        git(repo, "init", "-q", "-b", head)
        git(repo, "fast-import", "--quiet", "--done", stdin=b"".join([*self.chunks, b"done\n"]))
        git(repo, "checkout", "-q", "-f", head)


def _changes(before: State, after: State) -> dict[str, Blob | None]:
    """What turns `before` into `after`: new blobs, and None for deletions."""
    gone: dict[str, Blob | None] = dict.fromkeys(before.keys() - after.keys())
    return gone | {path: blob for path, blob in after.items() if before.get(path) != blob}


def _quote(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    for char, escaped in ((b"\\", b"\\\\"), (b'"', b'\\"'), (b"\n", b"\\n"), (b"\t", b"\\t")):
        raw = raw.replace(char, escaped)
    return b'"' + raw + b'"'


SPECIAL_NAMES = (
    "with space.txt",
    "ünïcødé/naïve.txt",
    "new\nline",
    "tab\there",
    "quo\"te's",
    "star*.py",
    "what?.md",
    "[brackets].cfg",
    "trailing space ",
    ":(exclude)colon",
    "-dash",
    "back\\slash",
)


def random_history(path: Path, *, seed: int, commits: int = 200, files: int = 50) -> None:
    """A random DAG history of about `commits` commits over about `files` paths."""
    dag = _RandomDag(seed, files)
    while dag.made < commits:
        roll = dag.rng.random()
        if roll < 0.1:
            dag.fork()
        elif roll < 0.12:
            dag.root()
        elif roll < 0.4:
            dag.merge()
        else:
            dag.edit()
    dag.finish()
    dag.importer.run(path)


class _RandomDag:
    """The steps of `random_history`, over the states of the open branches."""

    def __init__(self, seed: int, files: int) -> None:
        self.rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
        folders = ["", "src/", "src/deep/x/", "docs/"]
        self.names = list(SPECIAL_NAMES) + [
            f"{self.rng.choice(folders)}f{i:02d}.txt" for i in range(files - len(SPECIAL_NAMES))
        ]
        self.importer = _Importer()
        self.clock = 1_500_000_000
        self.made = 0
        first = {name: self.blob(name) for name in self.rng.sample(self.names, files // 2)}
        self.tips: dict[str, tuple[int, State]] = {
            "main": (self.commit("main", [], {}, first), first)
        }

    def blob(self, name: str) -> Blob:
        # Few contents per file, so the same change often lands on two branches.
        return ("100644", f"{name}:{self.rng.randrange(4)}\n".encode())

    def commit(self, ref: str, parents: list[int], before: State, after: State) -> int:
        self.made += 1
        self.clock += self.rng.randint(1, 1000)
        if self.rng.random() < 0.1:
            self.clock -= self.rng.randint(1000, 5000)  # clock skew: older than its parent
        return self.importer.commit(
            ref,
            parents,
            _changes(before, after),
            when=self.clock,
            author_when=self.clock - self.rng.randint(1, 10**5),
        )

    def fork(self) -> None:
        if len(self.tips) < 6:
            self.tips[f"b{self.made}"] = self.tips[self.rng.choice(sorted(self.tips))]

    def root(self) -> None:
        """Another root, merged in later like a subtree import."""
        state = {name: self.blob(name) for name in self.rng.sample(self.names, 3)}
        ref = f"root{self.made}"
        self.tips[ref] = (self.commit(ref, [], {}, state), state)

    def merge(self) -> None:
        """One or two branches into another; each file from a side or new content."""
        target = "main" if self.rng.random() < 0.5 else self.rng.choice(sorted(self.tips))
        # Distinct parents only: git itself never records one twice.
        seen = {self.tips[target][0]}
        others = []
        for ref in sorted(self.tips):
            if self.tips[ref][0] not in seen:
                seen.add(self.tips[ref][0])
                others.append(ref)
        if not others:
            return
        sources = self.rng.sample(others, min(len(others), 2 if self.rng.random() < 0.15 else 1))
        sides = [self.tips[target], *(self.tips[ref] for ref in sources)]
        result: State = {}
        if self.rng.random() < 0.1:
            result = dict(sides[0][1])  # merge -s ours
        else:
            for name in sorted(set().union(*(state.keys() for _, state in sides))):
                values = [state.get(name) for _, state in sides]
                if len(set(values)) > 1:
                    values = [self.rng.choice([*values, self.blob(name)])]
                if values[0] is not None:
                    result[name] = values[0]
        parents = [mark for mark, _ in sides]
        self.tips[target] = (self.commit(target, parents, sides[0][1], result), result)
        for ref in sources:
            if ref != "main" and self.rng.random() < 0.6:
                del self.tips[ref]

    def edit(self) -> None:
        """A commit on one branch: new content, deletes, chmods, symlinks."""
        ref = self.rng.choice(sorted(self.tips))
        mark, before = self.tips[ref]
        after = dict(before)
        for _ in range(self.rng.randint(1, 3)):
            name = self.rng.choice(self.names)
            kind = self.rng.random()
            if name in after and kind < 0.07:
                del after[name]
            elif name in after and kind < 0.17:
                mode, content = after[name]
                after[name] = ("100755" if mode == "100644" else "100644", content)
            elif kind < 0.28:
                after[name] = ("120000", f"target-{self.rng.randrange(3)}".encode())
            else:
                after[name] = self.blob(name)
        self.tips[ref] = (self.commit(ref, [mark], before, after), after)

    def finish(self) -> None:
        """Bring every branch still open into main at once: an octopus merge."""
        mark, state = self.tips.pop("main")
        sides = {tip: side for tip, side in self.tips.values() if tip != mark}
        if sides:
            result = dict(state)
            for side in sides.values():
                result.update(side)
            self.commit("main", [mark, *sides], state, result)


def topic_history(path: Path, *, seed: int, commits: int, files: int) -> None:
    """A long history shaped like git/git: topics forked from and merged into main."""
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not secrets
    folders = ["", "builtin/", "t/", "Documentation/", "contrib/x/", "compat/win/", "t/lib/"]
    names = [f"{rng.choice(folders)}file{i:05d}.c" for i in range(files)]
    # Popular files change often; many are never touched after the first commit.
    weights = [1 / (rank + 1) for rank in range(files)]
    importer = _Importer()
    clock = 1_100_000_000
    versions = 0

    def content(name: str) -> Blob:
        nonlocal versions
        versions += 1
        return ("100644", f"{name} v{versions}\n".encode())

    def commit(ref: str, parents: list[int], changes: Mapping[str, Blob | None]) -> int:
        nonlocal clock
        clock += rng.randint(60, 7200)
        if rng.random() < 0.02:
            clock -= rng.randint(7200, 90_000)
        return importer.commit(
            ref, parents, changes, when=clock, author_when=clock - rng.randint(0, 10**6)
        )

    main_state = {name: content(name) for name in names}
    main_tip = commit("main", [], main_state)
    # A topic: its tip, the main state it forked from and what it changed since.
    topics: list[tuple[int, State, State]] = []
    made = 1
    while made < commits:
        roll = rng.random()
        if roll < 0.08 or not topics:
            topics.append((main_tip, dict(main_state), {}))
            continue
        if roll < 0.62:
            at = rng.randrange(len(topics))
            tip, base, changes = topics[at]
            now = {name: content(name) for name in rng.choices(names, weights, k=rng.randint(1, 4))}
            topics[at] = (commit("topic", [tip], now), base, changes | now)
        elif roll < 0.9:
            tip, base, changes = topics.pop(rng.randrange(len(topics)))
            if not changes:
                continue
            delta: dict[str, Blob | None] = {}
            for name, blob in changes.items():
                if main_state[name] == base[name] or rng.random() < 0.7:
                    delta[name] = blob
                elif rng.random() < 0.5:
                    delta[name] = content(name)  # a conflict resolved by hand
            main_tip = commit("main", [main_tip, tip], delta)
            main_state.update((name, blob) for name, blob in delta.items() if blob)
        elif roll < 0.95:
            now = {name: content(name) for name in rng.choices(names, weights, k=rng.randint(1, 3))}
            main_tip = commit("main", [main_tip], now)
            main_state.update(now)
        else:
            # Back-merge: main into a topic, the topic's changes win.
            at = rng.randrange(len(topics))
            tip, base, changes = topics[at]
            delta = {
                name: blob
                for name, blob in main_state.items()
                if name not in changes and base[name] != blob
            }
            topics[at] = (commit("topic", [tip, main_tip], delta), dict(main_state), changes)
        made += 1
    importer.run(path)
