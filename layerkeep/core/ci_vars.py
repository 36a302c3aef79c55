"""What the CI says about this job (commit, branch, build id, reports), else what git says."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CiFacts:
    """Facts a CI publishes in its environment; empty strings where it says nothing."""

    commit: str = ""
    branch: str = ""
    build_id: str = ""
    reports_dir: str = ""


@dataclass(frozen=True)
class GitFacts:
    """The checkout's HEAD commit and branch; empty where git cannot tell."""

    commit: str
    branch: str


def detect(environ: Mapping[str, str]) -> CiFacts:
    """Read CircleCI, GitHub Actions and GitLab CI variables, in that order."""
    if environ.get("CIRCLE_SHA1") or environ.get("CIRCLECI"):
        return CiFacts(
            commit=environ.get("CIRCLE_SHA1", ""),
            branch=environ.get("CIRCLE_BRANCH", ""),
            build_id=environ.get("CIRCLE_BUILD_NUM", ""),
            reports_dir=environ.get("CIRCLE_TEST_REPORTS", ""),
        )
    if environ.get("GITHUB_ACTIONS") or environ.get("GITHUB_SHA"):
        # On pull requests GITHUB_REF_NAME is "<n>/merge"; GITHUB_HEAD_REF is the branch.
        return CiFacts(
            commit=environ.get("GITHUB_SHA", ""),
            branch=environ.get("GITHUB_HEAD_REF") or environ.get("GITHUB_REF_NAME", ""),
            build_id=environ.get("GITHUB_RUN_ID", ""),
        )
    if environ.get("GITLAB_CI") or environ.get("CI_COMMIT_SHA"):
        return CiFacts(
            commit=environ.get("CI_COMMIT_SHA", ""),
            branch=environ.get("CI_COMMIT_REF_NAME", ""),
            build_id=environ.get("CI_JOB_ID", ""),
        )
    return CiFacts()


def git_facts(folder: Path) -> GitFacts:
    """HEAD's SHA and branch name; empty strings outside a repository or without commits."""
    return GitFacts(
        commit=_git(folder, "rev-parse", "--verify", "--quiet", "HEAD"),
        branch=_git(folder, "symbolic-ref", "--quiet", "--short", "HEAD"),
    )


def _git(folder: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
