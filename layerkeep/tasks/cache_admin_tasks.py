"""cache.status and cache.prune: see what the cache holds, and remove what nobody reads.

Neither is in `inv ci`: run cache.status whenever, cache.prune from a scheduled job
(docs/cache-maintenance.md). A read-only job (a pull request, see
LAYERKEEP_CACHE_READ_ONLY) may look, and cache.prune refuses to delete there.
"""

import json as json_text

from invoke.context import Context

from layerkeep.cache.budget import MB, keep_within_budget, plan_budget
from layerkeep.cache.prune import describe_prune, prune_registry, refuse_if_read_only
from layerkeep.cache.registry_backend import cache_location
from layerkeep.cache.status import cache_status, status_lines
from layerkeep.core.errors import ConfigError
from layerkeep.core.settings import Settings
from layerkeep.dryrun import prune_plan, status_plan
from layerkeep.git.remote_heads import remote_branches

from .cache_load_tasks import CACHE_FLAGS
from .graph import Done, Note, is_dry, say_plan, settings, step
from .taskkit import environ, masked_log, say


@step(
    "cache.status",
    flags=CACHE_FLAGS,
    help={"json": "print the status as JSON on one line, the last (for scripts)"},
    uses_job=False,
)
def status(c: Context, json: bool = False) -> Note:
    """Show what the cache holds: images (per branch scope for the registry), layers,
    sizes, last save and restore, cache mounts, BuildKit's cache, scopes' ages."""
    current = settings(c)
    if is_dry(c):
        return say_plan(status_plan(current))
    found = cache_status(current, environ())
    # One line, the output's last: `inv cache.status --json | tail -n 1` for a script.
    lines = [json_text.dumps(found, sort_keys=True)] if json else status_lines(found)
    for line in lines:
        say(line)
    registry = found["backend"] == "registry"
    held = len(found["scopes"] if registry else found["images"])
    kind = "scope(s)" if registry else "image(s)"
    return Done(f"{held} {kind}, {found.get('bytes', 0) / MB:.1f} MB", {"status": found})


@step(
    "cache.prune",
    flags=[*CACHE_FLAGS, "--max-mb"],
    help={
        "older_than": "registry: remove scopes not saved for this many days "
        "(default LAYERKEEP_CACHE_PRUNE_DAYS, 14)",
        "branches": "registry: the live branches, comma-separated (else `git ls-remote "
        "--heads REMOTE`); scopes of other branches go",
        "remote": "the git remote whose branches are live (default origin)",
        "dry_run": "say what would go, delete nothing",
    },
)
def prune(
    c: Context,
    older_than: str = "",
    branches: str = "",
    remote: str = "origin",
    dry_run: bool = False,
) -> Note:
    """Remove what nobody will read: registry scopes of old or gone branches (never the
    fallback branch's), or, for a cache folder, what is past LAYERKEEP_CACHE_MAX_MB."""
    current = settings(c)
    days = _days(older_than, current)
    if is_dry(c):
        return say_plan(prune_plan(current, days))
    log = masked_log(current)
    if current.cache_backend == "dir":
        return _prune_folder(current, dry_run=dry_run)
    if not dry_run:
        refuse_if_read_only(current, "cache.prune")
    live = _live_branches(current, branches, remote)
    report = prune_registry(
        current, environ(), older_than=days, live_branches=live, dry_run=dry_run, log=log
    )
    lines = describe_prune(report, cache_location(current).repository)
    for line in lines:
        say(line)
    return Done(lines[-1] if report.dry_run else lines[0 if not report.removed else -2], {
        "removed": [item.scope.name for item in report.removed],
        "kept": report.kept,
        "interrupted": report.interrupted,
        "tags_deleted": report.tags_deleted,
        "bytes_freed": report.freed,
        "dry_run": report.dry_run,
    })


def _prune_folder(current: Settings, *, dry_run: bool) -> Note:
    if not current.cache_max_mb:
        say("the cache folder keeps only the current images: set LAYERKEEP_CACHE_MAX_MB "
            "to bound it too")
        return "nothing to prune (no LAYERKEEP_CACHE_MAX_MB)"
    limit = current.cache_max_mb * MB
    if dry_run:
        return say_plan(plan_budget(current.cache_dir, limit))
    refuse_if_read_only(current, "cache.prune")
    report = keep_within_budget(
        current.cache_dir, limit, written_images=(), written_mounts=(), log=masked_log(current)
    )
    went = len(report.images) + len(report.mounts)
    return Done(f"{went} dropped, {report.after / MB:.1f} MB of {current.cache_max_mb} MB",
                {"images_dropped": report.images, "mounts_dropped": report.mounts,
                 "bytes": report.after})


def _days(given: str, current: Settings) -> int:
    if not given:
        return current.cache_prune_days
    if not given.strip().isdigit() or int(given) < 1:
        raise ConfigError(
            f"cache.prune --older-than {given!r} is not a number of days",
            key="--older-than", hint="give a whole number of days, e.g. --older-than 14",
        )
    return int(given)


def _live_branches(current: Settings, branches: str, remote: str) -> tuple[str, ...] | None:
    """The live branches: --branches, else the remote's; None (no branch check) when
    neither answers, or the remote lacks the fallback branch (a list to distrust)."""
    if branches.strip():
        return tuple(name.strip() for name in branches.split(",") if name.strip())
    found = remote_branches(current.project_dir, remote, environ())
    if found is None:
        say(f"git ls-remote --heads {remote} did not answer: no scope is removed for its "
            "branch being gone (pass --branches main,feature-x,... to name the live ones)")
        return None
    if current.cache_fallback_branch not in found:
        say(f"{remote} has no branch {current.cache_fallback_branch} (the fallback): its list "
            "is not trusted, no scope is removed for its branch being gone")
        return None
    return found
