"""What the CI says about this job (commit, branch, build id, reports, pull request, default
branch), else what git says."""

from __future__ import annotations

import hashlib
import re
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
    # The branch a pull/merge request targets, else the repository's default branch.
    default_branch: str = ""
    pull_request: bool = False
    # Parallel nodes of this job: this node's number from 1, and how many (0: not said).
    node_index: int = 0
    node_total: int = 0


@dataclass(frozen=True)
class GitFacts:
    """The checkout's HEAD commit and branch; empty where git cannot tell."""

    commit: str
    branch: str


def detect(environ: Mapping[str, str]) -> CiFacts:
    """Read CircleCI, GitHub Actions and GitLab CI variables, in that order.

    The build id is unique per concurrently running job, so that jobs sharing an engine
    get their own containers and networks.
    """
    if environ.get("CIRCLE_SHA1") or environ.get("CIRCLECI"):
        index, total = _nodes(environ, "CIRCLE_NODE_INDEX", "CIRCLE_NODE_TOTAL", first=0)
        return CiFacts(
            commit=environ.get("CIRCLE_SHA1", ""),
            branch=environ.get("CIRCLE_BRANCH", ""),
            build_id=_circle_build_id(environ),
            reports_dir=environ.get("CIRCLE_TEST_REPORTS", ""),
            # CIRCLE_PR_NUMBER is set for pull requests from forks only.
            pull_request=bool(
                environ.get("CIRCLE_PULL_REQUEST") or environ.get("CIRCLE_PR_NUMBER")
            ),
            node_index=index,
            node_total=total,
        )
    if environ.get("GITHUB_ACTIONS") or environ.get("GITHUB_SHA"):
        # On pull requests GITHUB_REF_NAME is "<n>/merge"; GITHUB_HEAD_REF is the branch.
        return CiFacts(
            commit=environ.get("GITHUB_SHA", ""),
            branch=environ.get("GITHUB_HEAD_REF") or environ.get("GITHUB_REF_NAME", ""),
            build_id=_github_build_id(environ),
            # Only pull_request(_target) runs set GITHUB_BASE_REF; no variable names the
            # repository's default branch.
            default_branch=environ.get("GITHUB_BASE_REF", ""),
            pull_request=bool(environ.get("GITHUB_HEAD_REF"))
            or environ.get("GITHUB_EVENT_NAME", "") in ("pull_request", "pull_request_target"),
        )
    if environ.get("GITLAB_CI") or environ.get("CI_COMMIT_SHA"):
        # CI_JOB_ID differs for every job, parallel:matrix leg and retry.
        index, total = _nodes(environ, "CI_NODE_INDEX", "CI_NODE_TOTAL", first=1)
        return CiFacts(
            commit=environ.get("CI_COMMIT_SHA", ""),
            branch=environ.get("CI_COMMIT_REF_NAME", ""),
            build_id=safe_build_id(environ.get("CI_JOB_ID", "")),
            default_branch=environ.get("CI_MERGE_REQUEST_TARGET_BRANCH_NAME")
            or environ.get("CI_EXTERNAL_PULL_REQUEST_TARGET_BRANCH_NAME")
            or environ.get("CI_DEFAULT_BRANCH", ""),
            pull_request=bool(
                environ.get("CI_MERGE_REQUEST_IID") or environ.get("CI_EXTERNAL_PULL_REQUEST_IID")
            ),
            node_index=index,
            node_total=total,
        )
    return CiFacts()


def _nodes(environ: Mapping[str, str], index: str, total: str, *, first: int) -> tuple[int, int]:
    """This node's number (from 1) and the node count, from a CI's variables whose first
    node is ``first`` (CircleCI counts from 0, GitLab from 1); (0, 0) when they are
    missing or odd."""
    given = environ.get(index, ""), environ.get(total, "")
    if not all(text.isascii() and text.isdigit() for text in given):
        return 0, 0
    number, count = int(given[0]) - first + 1, int(given[1])
    return (number, count) if 1 <= number <= count <= 1000 else (0, 0)


def _circle_build_id(environ: Mapping[str, str]) -> str:
    # Parallel nodes of one job share its ids; only the node index tells them apart.
    job = environ.get("CIRCLE_WORKFLOW_JOB_ID") or environ.get("CIRCLE_BUILD_NUM", "")
    nodes = environ.get("CIRCLE_NODE_TOTAL", "1")
    if job and nodes.isascii() and nodes.isdigit() and int(nodes) > 1:
        job = f"{job}-{environ.get('CIRCLE_NODE_INDEX', '0')}"
    return safe_build_id(job)


def _github_build_id(environ: Mapping[str, str]) -> str:
    # Every leg of a matrix and every re-run shares GITHUB_RUN_ID, and the legs share
    # GITHUB_JOB; no variable names the leg. A runner runs one job at a time, so two
    # legs running at once on one engine run on two runners: RUNNER_NAME parts them.
    run = environ.get("GITHUB_RUN_ID", "")
    if not run:
        return ""
    parts = [run, environ.get("GITHUB_RUN_ATTEMPT", ""), environ.get("GITHUB_JOB", "")]
    runner = environ.get("RUNNER_NAME", "")
    if runner:
        parts.append(_short_hash(runner))
    return safe_build_id("-".join(part for part in parts if part))


_COMMIT = re.compile(r"[0-9a-fA-F]{4,64}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_MAX_BUILD_ID = 64


def safe_build_id(text: str) -> str:
    """``text`` within Docker's name alphabet; altered text gets a short hash of the original.

    The hash keeps two ids apart that differ only in characters that were replaced.
    """
    safe = _UNSAFE.sub("-", text).strip("-._")[:_MAX_BUILD_ID]
    if safe == text:
        return safe
    return f"{safe[: _MAX_BUILD_ID - 9]}-{_short_hash(text)}" if safe else _short_hash(text)


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def git_facts(folder: Path) -> GitFacts:
    """HEAD's SHA and branch name; empty strings outside a repository or without commits."""
    return GitFacts(
        commit=_git(folder, "rev-parse", "--verify", "--quiet", "HEAD"),
        branch=_git(folder, "symbolic-ref", "--quiet", "--short", "HEAD"),
    )


def commit_time(folder: Path, commit: str) -> float | None:
    """When ``commit`` was committed (Unix time), as git in ``folder`` says; None when
    git cannot tell."""
    if not _COMMIT.fullmatch(commit):
        return None
    text = _git(folder, "log", "-1", "--format=%ct", commit, "--")
    return float(text) if text.isascii() and text.isdigit() else None


def _git(folder: Path, *args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), *args], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""
