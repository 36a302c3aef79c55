"""release.push: tag the built app image and push it to LAYERKEEP_REGISTRY, then verify.

Tags, in ``<registry>/<image repository>`` (a registry host already in
LAYERKEEP_IMAGE is replaced by LAYERKEEP_REGISTRY):

- the commit SHA (full);
- the branch, by :func:`branch_tag`: as it is when it is a valid tag (``main``,
  ``Feature-A``); otherwise made valid and given a short hash of its name
  (``feature/Login_2`` -> ``feature-login_2-<10 hex>``), so two branches never share a
  tag; ``latest`` (any case) is hashed too, so it cannot take the meaning of ``:latest``;
- ``latest`` when the branch is LAYERKEEP_RELEASE_LATEST_BRANCH;
- each of LAYERKEEP_RELEASE_TAGS, where ``{git_tag}`` is the tag at HEAD
  (``git describe --exact-match --tags HEAD``); a template using it is dropped when
  HEAD has no tag.

Only branches matching LAYERKEEP_RELEASE_BRANCHES (globs, default ``*``) are pushed; an
empty LAYERKEEP_REGISTRY means there is nothing to release. Check, plan, act, verify:
every tag must resolve in the registry to the digest its push reported.
"""

from __future__ import annotations

import fnmatch
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError, DockerOperationError
from layerkeep.core.imageref import ImageRef, is_valid_tag
from layerkeep.core.log import Log
from layerkeep.core.progress import MeterFactory, silent
from layerkeep.core.registry import Pushed, push_tag, remote_digest
from layerkeep.core.registry_credentials import (
    Credentials,
    credentials_for,
    path_in_registry,
)
from layerkeep.core.registry_failures import Retries, Sleep
from layerkeep.core.settings import Settings
from layerkeep.core.tag_names import safe_tag

GitTag = Callable[[Path], str]
GIT_TAG = "{git_tag}"


def head_git_tag(folder: Path) -> str:
    """The tag at HEAD (``git describe --exact-match --tags HEAD``), or "" when none."""
    try:
        done = subprocess.run(
            ["git", "-C", str(folder), "describe", "--exact-match", "--tags", "HEAD"],
            capture_output=True, text=True, check=False, timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def branch_tag(branch: str) -> str:
    """The tag a branch's images get: valid, never ``latest``, never another branch's.

    The branch itself when it is a valid tag; otherwise its readable form with a short
    hash of the name (the rule is :func:`~layerkeep.core.tag_names.safe_tag`'s).
    """
    return safe_tag(branch)


@dataclass(frozen=True)
class ReleasePlan:
    """What release.push would do: the tags, where, and whether it pushes (and why not)."""

    source: str
    registry: str
    repository: str
    tags: tuple[str, ...]
    pushes: bool
    reason: str = ""
    who: str = ""

    @property
    def references(self) -> tuple[ImageRef, ...]:
        """Every ``<registry>/<repository>:<tag>`` the release pushes."""
        return tuple(ImageRef(self.repository, tag) for tag in self.tags)

    def describe(self) -> str:
        """One line: what goes where, or why nothing does."""
        if not self.registry:
            return f"release: {self.reason}"
        tags = ", ".join(self.tags) or "none"
        where = f"{self.repository} ({self.who})"
        if not self.pushes:
            return f"release: not pushing {self.source} to {where}: {self.reason} (tags: {tags})"
        return f"release: {self.source} -> {where} as {tags}"


@dataclass(frozen=True)
class PushedTag:
    """One tag of a release, pushed and checked against the registry."""

    reference: str
    digest: str
    push_seconds: float
    attempts: int
    verified: bool


@dataclass
class ReleaseReport:
    """What push_release did, with its timings."""

    plan: ReleasePlan
    dry_run: bool = False
    pushed: list[PushedTag] = field(default_factory=list)
    layers_pushed: int = 0
    bytes_pushed: int = 0
    push_seconds: float = 0.0
    verify_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def digest(self) -> str:
        """The manifest digest every tag resolves to ("" when nothing was pushed)."""
        return self.pushed[0].digest if self.pushed else ""


def plan_release(settings: Settings, *, git_tag: GitTag = head_git_tag) -> ReleasePlan:
    """Work out the release from the settings alone (plus the tag at HEAD, if asked)."""
    if not settings.registry:
        return ReleasePlan("", "", "", (), False, "LAYERKEEP_REGISTRY is empty: nothing to push")
    image = settings.require_image()
    credentials = credentials_for(settings, settings.registry)
    repository = f"{settings.registry}/{path_in_registry(image.repository)}"
    tags = _tags(settings, git_tag)
    reason = ""
    if not settings.branch:
        reason = "no branch known (detached HEAD?); set LAYERKEEP_BRANCH"
    elif not any(fnmatch.fnmatchcase(settings.branch, glob) for glob in settings.release_branches):
        reason = (
            f"branch {settings.branch!r} matches none of LAYERKEEP_RELEASE_BRANCHES "
            f"({', '.join(settings.release_branches)})"
        )
    elif not settings.commit:
        raise ConfigError(
            "no commit SHA to tag the release with",
            key="LAYERKEEP_COMMIT",
            hint="run in a git checkout, or set LAYERKEEP_COMMIT",
        )
    return ReleasePlan(
        str(image), settings.registry, repository, tags, not reason, reason, credentials.who()
    )


def _tags(settings: Settings, git_tag: GitTag) -> tuple[str, ...]:
    tags: list[str] = []
    if settings.commit:
        tags.append(safe_tag(settings.commit, empty_prefix="commit"))
    if settings.branch:
        tags.append(branch_tag(settings.branch))
        if settings.branch == settings.release_latest_branch:
            tags.append("latest")
    head_tag: str | None = None
    for template in settings.release_tags:
        if GIT_TAG in template:
            if head_tag is None:
                head_tag = git_tag(settings.project_dir)
            if not head_tag:
                continue
        tag = template.replace(GIT_TAG, safe_tag(head_tag) if head_tag else "")
        if not is_valid_tag(tag) or "{" in tag:
            raise ConfigError(
                f"LAYERKEEP_RELEASE_TAGS: {template!r} does not give a valid tag ({tag!r})",
                key="LAYERKEEP_RELEASE_TAGS",
                hint="use letters, digits, '_', '.', '-' (up to 128) and {git_tag}",
            )
        tags.append(tag)
    return tuple(dict.fromkeys(tags))


def push_release(
    engine: Engine,
    settings: Settings,
    *,
    dry_run: bool = False,
    log: Log = print,
    git_tag: GitTag = head_git_tag,
    sleep: Sleep = time.sleep,
    progress: MeterFactory = silent,
) -> ReleaseReport:
    """Tag the app image, push every tag, and check each resolves to the pushed digest."""
    started = time.monotonic()
    plan = plan_release(settings, git_tag=git_tag)
    report = ReleaseReport(plan, dry_run=dry_run)
    log(plan.describe())
    if not plan.pushes:
        return report
    image_id = engine.image_id(plan.source)
    if image_id is None:
        raise DockerOperationError(
            f"the app image {plan.source} is not in the engine",
            image=plan.source,
            hint="build it first with `inv image.build`",
        )
    if dry_run:
        log(f"dry run: would push {len(plan.tags)} tag(s) of {image_id[:19]}; nothing changed")
        return report
    credentials = credentials_for(settings, settings.registry)
    created: list[str] = []
    try:
        for reference in plan.references:
            if engine.image_id(str(reference)) is None:
                created.append(str(reference))
            engine.tag_image(plan.source, str(reference))
        for reference in plan.references:
            pushed = push_tag(
                engine, reference, credentials, Retries.of(settings, log, sleep),
                progress=progress,
            )
            _record(report, pushed)
            log(
                f"pushed {reference} ({pushed.layers_pushed} new layer(s), "
                f"{pushed.bytes_pushed / 1e6:.1f} MB, {pushed.seconds:.1f} s)"
            )
    finally:
        for name in created:
            # Only the names we made: a laptop does not collect one tag per commit.
            engine.remove_image(name, prune=False)
    report.verify_seconds = _verify(engine, report, credentials, Retries.of(settings, log, sleep))
    report.seconds = time.monotonic() - started
    log(
        f"released {plan.source} to {plan.registry}: {len(report.pushed)} tag(s) at "
        f"{report.digest}, verified; push {report.push_seconds:.1f} s, "
        f"verify {report.verify_seconds:.1f} s"
    )
    return report


def _record(report: ReleaseReport, pushed: Pushed) -> None:
    report.pushed.append(
        PushedTag(pushed.reference, pushed.digest, pushed.seconds, pushed.attempts, False)
    )
    report.layers_pushed += pushed.layers_pushed
    report.bytes_pushed += pushed.bytes_pushed
    report.push_seconds += pushed.seconds


def _verify(
    engine: Engine,
    report: ReleaseReport,
    credentials: Credentials,
    retries: Retries,
) -> float:
    """Ask the registry what each tag resolves to; it must be the digest we pushed."""
    started = time.monotonic()
    for index, (reference, pushed) in enumerate(
        zip(report.plan.references, report.pushed, strict=True)
    ):
        found = remote_digest(engine, reference, credentials, retries)
        if found != pushed.digest:
            raise DockerOperationError(
                f"{pushed.reference} resolves to {found or 'nothing'} in {credentials.registry}, "
                f"not to the pushed {pushed.digest}",
                image=pushed.reference,
                hint="another job may have pushed the same tag at the same time; run it again",
            )
        report.pushed[index] = PushedTag(
            pushed.reference, pushed.digest, pushed.push_seconds, pushed.attempts, True
        )
    return time.monotonic() - started
