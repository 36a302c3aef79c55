"""cache.prune for the registry backend: remove the branch scopes nobody will read again.

A scope goes when it was not saved for ``older_than`` days, when its branch is gone
(not among the live branches: `git ls-remote --heads`, or a list the user gives), or
when a prune left it half removed. The fallback branch's scope never goes, nor a scope
whose age nothing tells (no marker, no image config) unless its branch is gone.

Each scope is removed in an order a reader can trust (see cache.scope_marker and
cache.whole_scope): its marker becomes ``pruning``, its other tags are deleted one by
one (each through a tombstone of its own, so that no other scope's tag naming the same
image goes with it), and the marker goes last. A save of that scope meanwhile (its
marker replaced) stops the removal there: the scope is in use again.

Deleting manifests leaves their blobs in the registry's storage: its own garbage
collection frees them (``registry garbage-collect --delete-untagged``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

from layerkeep.cache.registry_backend import cache_location, cache_scope, scope_name
from layerkeep.cache.registry_scopes import Scope, age_days, read_scopes, unique_sizes, when
from layerkeep.cache.scope_marker import delete_tag, marker_tag, write_marker
from layerkeep.core.errors import LayerkeepError
from layerkeep.core.log import Log
from layerkeep.core.registry_api import RegistryClient
from layerkeep.core.registry_credentials import path_in_registry
from layerkeep.core.registry_failures import TagNotFound
from layerkeep.core.settings import Settings

# A digest no manifest has: deleting it tells whether the registry allows deletes.
NO_SUCH_MANIFEST = "sha256:" + "0" * 64


class PruneRefused(LayerkeepError):
    """cache.prune will not delete here: a read-only job (a pull request)."""


@dataclass(frozen=True)
class Doomed:
    """A scope to remove, and why."""

    scope: Scope
    reason: str
    unique_bytes: int


@dataclass
class PruneReport:
    """What a prune removed (or would, in a dry run) and what it kept."""

    removed: list[Doomed] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    # Scopes saved again while they were being removed: left, in use.
    interrupted: list[str] = field(default_factory=list)
    tags_deleted: int = 0
    dry_run: bool = False

    @property
    def freed(self) -> int:
        """Bytes no remaining scope names, once the registry collects its garbage."""
        return sum(item.unique_bytes for item in self.removed)


def refuse_if_read_only(settings: Settings, what: str) -> None:
    """PruneRefused when this job may not write the cache (LAYERKEEP_CACHE_READ_ONLY)."""
    read_only = cache_scope(settings).read_only
    if read_only:
        raise PruneRefused(
            f"{what} deletes nothing here, the cache is read-only in this job: {read_only}",
            hint="run it from a scheduled job on the default branch",
        )


def choose(
    scopes: Collection[Scope],
    *,
    fallback: str,
    older_than: float,
    live: Collection[str] | None,
    now: float,
) -> tuple[list[Doomed], list[str]]:
    """The scopes to remove (see the module's notes), and the names of those kept.

    ``live`` holds the scope names of the live branches, or None for no branch check.
    """
    sizes = unique_sizes(scopes)
    doomed, kept = [], []
    for scope in scopes:
        reason = "" if scope.name == fallback else _reason(scope, older_than, live, now)
        if reason:
            doomed.append(Doomed(scope, reason, sizes[scope.name]))
        else:
            kept.append(scope.name)
    return doomed, kept


def prune_registry(
    settings: Settings,
    environ: Mapping[str, str],
    *,
    older_than: float,
    live_branches: Collection[str] | None,
    dry_run: bool,
    log: Log,
    now: Callable[[], float] = time.time,
    deleted: Callable[[str], None] = lambda _: None,
) -> PruneReport:
    """Remove the registry cache's stale scopes (see the module's notes).

    ``live_branches`` None skips the gone-branch check. ``deleted`` is told each tag
    as it goes (tests run a load between two deletes).
    """
    if not dry_run:
        refuse_if_read_only(settings, "cache.prune")
    location = cache_location(settings)
    repository = path_in_registry(location.repository)
    fallback = cache_scope(settings).fallback
    live = None if live_branches is None else {scope_name(b) for b in live_branches}
    report = PruneReport(dry_run=dry_run)
    with RegistryClient(
        location.credentials, environ=environ, timeout=settings.docker_timeout
    ) as client:
        scopes = read_scopes(client, repository)
        report.removed, report.kept = choose(
            scopes, fallback=fallback, older_than=older_than, live=live, now=now()
        )
        if dry_run or not report.removed:
            return report
        _check_deletes_allowed(client, repository)
        for doomed in report.removed:
            count, whole = _remove(
                client, repository, doomed.scope, build_id=settings.build_id, at=now(),
                deleted=deleted,
            )
            report.tags_deleted += count
            if not whole:
                report.interrupted.append(doomed.scope.name)
                log(f"cache scope {doomed.scope.name} was saved again while it was being "
                    "removed: left, it is in use")
            else:
                log(f"removed cache scope {doomed.scope.name}: {doomed.reason}; "
                    f"{count} tag(s), {doomed.unique_bytes / 1e6:.1f} MB of its own")
    report.removed = [d for d in report.removed if d.scope.name not in report.interrupted]
    return report


def describe_prune(report: PruneReport, repository: str) -> list[str]:
    """The lines a prune ends with (or a dry run's plan)."""
    verb = "would remove" if report.dry_run else "removed"
    lines = [
        f"{verb} {item.scope.name}: {item.reason}; {len(item.scope.tags) + 1} tag(s), "
        f"{item.unique_bytes / 1e6:.1f} MB of its own"
        for item in report.removed
    ] if report.dry_run else []
    lines.append(
        f"{verb} {len(report.removed)} scope(s) of {repository} "
        f"({report.freed / 1e6:.1f} MB once the registry collects its garbage), "
        f"kept {len(report.kept)}"
    )
    if report.removed and not report.dry_run:
        lines.append(
            "the blobs stay until the registry's garbage collection frees them: "
            "registry garbage-collect --delete-untagged /etc/docker/registry/config.yml"
        )
    return lines


def _reason(
    scope: Scope, older_than: float, live: Collection[str] | None, now: float
) -> str:
    if scope.marker is not None and scope.marker.state == "pruning":
        return "a prune left it half removed"
    if live is not None and scope.name not in live:
        branch = scope.branch or scope.name
        return f"branch {branch} is gone"
    age = age_days(scope.saved, now)
    if age is not None and age > older_than:
        return f"not saved for {age:.0f} days, since {when(scope.saved)} UTC"
    return ""


def _check_deletes_allowed(client: RegistryClient, repository: str) -> None:
    """DeleteDisabled (with how to allow deletes) before anything is changed."""
    try:
        client.delete_manifest(repository, NO_SUCH_MANIFEST)
    except TagNotFound:
        return


def _remove(
    client: RegistryClient, repository: str, scope: Scope, *, build_id: str, at: float,
    deleted: Callable[[str], None],
) -> tuple[int, bool]:
    """Remove one scope, marker last: the tags deleted (the marker too), and False when a
    save of the scope took its marker back meanwhile (the rest is left)."""
    mark = write_marker(
        client, repository, scope.name, state="pruning", branch=scope.branch,
        build_id=build_id, at=at,
    )
    count = 0
    for tag in scope.tags:
        if client.manifest_digest(repository, marker_tag(scope.name)) != mark:
            return count, False
        delete_tag(client, repository, tag.tag)
        count += 1
        deleted(tag.tag)
    if client.manifest_digest(repository, marker_tag(scope.name)) != mark:
        return count, False
    client.delete_manifest(repository, mark)
    deleted(marker_tag(scope.name))
    return count + 1, True
