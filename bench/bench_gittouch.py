"""Time layerkeep.git.touch against git-restore-mtime and check it against `git log -1`.

    python bench/bench_gittouch.py PATH_TO_CLONE [--oracle | --oracle-sample N]
    python bench/bench_gittouch.py NEW_PATH --generate COMMITS FILES   # a git/git-shaped repo

Both tools only set mtimes, so they run in place. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from layerkeep.git.touch import last_change_times, touch

RESTORE_MTIME = ["git", "restore-mtime", "--quiet", "--commit-time"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repo", type=Path, help="a local clone (left as it is, but for mtimes)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each tool (median)")
    parser.add_argument("--oracle", action="store_true", help="compare every file with git log")
    parser.add_argument("--oracle-sample", type=int, metavar="N", help="compare N random files")
    parser.add_argument(
        "--generate",
        nargs=2,
        type=int,
        metavar=("COMMITS", "FILES"),
        help="first build a git/git-shaped history at REPO (tests/gitrepos.py)",
    )
    args = parser.parse_args()
    repo: Path = args.repo.resolve()
    if args.generate:
        generate(repo, commits=args.generate[0], files=args.generate[1])

    files = len(last_change_times(repo))
    commits = run_git(repo, "rev-list", "--count", "HEAD").strip()
    print(f"repository: {repo}")
    print(f"files: {files}  commits: {commits}")

    reports = []

    def ours() -> None:
        reports.append(touch(repo))

    our_time = median_seconds(ours, args.runs)
    print(f"layerkeep.gittouch.touch: {our_time:.2f} s (median of {args.runs})")
    print(f"  commits read: {reports[-1].commits_read}  touched: {reports[-1].touched}")
    if not restore_mtime_installed():
        print("git-restore-mtime: not installed (Debian package git-restore-mtime)")
    else:
        theirs = median_seconds(
            lambda: subprocess.run([*RESTORE_MTIME], cwd=repo, check=True), args.runs
        )
        print(f"{' '.join(RESTORE_MTIME)}: {theirs:.2f} s (median of {args.runs})")
        print(f"ratio: {theirs / our_time:.1f}x faster")

    if args.oracle or args.oracle_sample:
        compare_with_oracle(repo, args.oracle_sample)


def restore_mtime_installed() -> bool:
    """git runs it as `git restore-mtime` from its exec path, which is not on PATH."""
    try:
        done = subprocess.run([*RESTORE_MTIME[:2], "--version"], capture_output=True, check=False)
    except FileNotFoundError:
        return False
    return done.returncode == 0


def generate(repo: Path, *, commits: int, files: int) -> None:
    if repo.exists():
        sys.exit(f"{repo} exists: --generate builds a new repository")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    gitrepos = importlib.import_module("gitrepos")
    started = time.monotonic()
    gitrepos.topic_history(repo, seed=7, commits=commits, files=files)
    print(f"generated {repo} in {time.monotonic() - started:.1f} s")


def compare_with_oracle(repo: Path, sample: int | None) -> None:
    """The per-file loop on every file, or on a random sample of them."""
    ours = last_change_times(repo)
    paths = sorted(ours)
    if sample is not None and sample < len(paths):
        paths = random.Random(0).sample(paths, sample)  # noqa: S311 - a sample, not a secret
    started = time.monotonic()
    disagree = []
    for path in paths:
        out = run_git(repo, "--literal-pathspecs", "log", "-1", "--format=%ct", "--", path)
        if int(out) != ours[path]:
            disagree.append(path)
    seconds = time.monotonic() - started
    print(f"oracle (git log -1 per file): {len(paths)} files in {seconds:.1f} s")
    print(f"disagreements: {len(disagree)} {disagree[:10] if disagree else ''}")


def median_seconds(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.monotonic()
        action()
        times.append(time.monotonic() - started)
    return statistics.median(times)


def run_git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


if __name__ == "__main__":
    main()
