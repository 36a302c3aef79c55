"""cache.save: keep what the next build needs (a folder, or a registry).

In `inv ci` a failure is a warning and the job goes on: the cache is an optimisation.
Run alone, a failure exits non-zero with one line.
"""

from invoke.context import Context

from layerkeep.cache.backend import describe_save, save_cache
from layerkeep.cache.mount_store import describe_mounts, save_cache_mounts
from layerkeep.cache.upkeep import after_save
from layerkeep.dryrun import save_plan

from .cache_load_tasks import CACHE_FLAGS
from .graph import Done, Note, engine, is_dry, resolved_builder, say_plan, settings, step
from .image_tasks import build
from .taskkit import environ, masked_log, meters


@step("cache.save", pre=[build], flags=[*CACHE_FLAGS, "--max-mb"], role="cache")
def save(c: Context) -> Note:
    """Build, then save what the next build needs: the app's layers (its images, or
    BuildKit's own cache where the builder exports it) and LAYERKEEP_CACHE_IMAGES."""
    current = settings(c)
    if is_dry(c):
        return say_plan(save_plan(current))
    connected, log = engine(c, current), masked_log(current)
    chosen = resolved_builder(c, current)
    outcome = save_cache(connected, current, chosen, environ(), log=log, progress=meters())
    mounts = save_cache_mounts(connected, current, chosen, environ(), log=log)
    budget = after_save(current, outcome, mounts, log=log)
    report, buildkit = outcome.images, outcome.buildkit
    figures = {
        "saved": list(report.saved),
        "unchanged": list(report.unchanged),
        "layers_written": report.layers_written,
        "bytes_written": report.bytes_written,
        "bytes_read": report.bytes_read,
        "engine_reads": report.engine_reads,
        "inline_cache_completed": list(report.completed),
        "inline_cache_uncovered": dict(report.uncovered),
        "buildkit_blobs_written": buildkit.blobs_written if buildkit else None,
        "buildkit_bytes_written": buildkit.bytes_written if buildkit else None,
        "buildkit_cache_bytes": buildkit.size if buildkit else None,
        "buildkit_pushed_to": outcome.pushed_to,
        "cache_mounts_saved": list(mounts.saved),
        "budget_dropped": [*budget.images, *budget.mounts] if budget else [],
    }
    note = describe_save(outcome)
    if not mounts.skipped:
        note += f"; {describe_mounts(mounts)}"
    if budget and (budget.images or budget.mounts or budget.over):
        note += f"; {len(budget.images) + len(budget.mounts)} dropped for LAYERKEEP_CACHE_MAX_MB"
    return Done(note, figures)
