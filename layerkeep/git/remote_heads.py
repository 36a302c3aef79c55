"""The branches a git remote has now (`git ls-remote --heads`), for cache.prune."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

HEADS = "refs/heads/"
TIMEOUT = 60


def remote_branches(
    project_dir: Path, remote: str, environ: Mapping[str, str]
) -> tuple[str, ...] | None:
    """The branch names ``remote`` has, or None when it does not answer (no such
    remote, no network, refused credentials): git is never left waiting for a password."""
    quiet = {**environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true", "SSH_ASKPASS": "true"}
    try:
        answer = subprocess.run(
            ["git", "ls-remote", "--heads", "--", remote],
            cwd=project_dir, env=quiet, capture_output=True, text=True, timeout=TIMEOUT,
            check=False, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if answer.returncode != 0:
        return None
    names = []
    for line in answer.stdout.splitlines():
        _, _, ref = line.partition("\t")
        if ref.startswith(HEADS):
            names.append(ref.removeprefix(HEADS))
    return tuple(names)
