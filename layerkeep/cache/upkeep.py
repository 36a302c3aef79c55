"""What cache.load and cache.save do for the folder cache's upkeep: record what was used
(cache.usage) and keep to LAYERKEEP_CACHE_MAX_MB (cache.budget)."""

from __future__ import annotations

from layerkeep.cache.backend import SaveOutcome
from layerkeep.cache.budget import MB, BudgetReport, keep_within_budget
from layerkeep.cache.layer_load import LoadReport
from layerkeep.cache.mount_store import MountsReport
from layerkeep.cache.registry_backend import cache_scope
from layerkeep.cache.usage import image_key, mount_key, record_use
from layerkeep.core.log import Log
from layerkeep.core.settings import Settings


def after_load(settings: Settings, report: LoadReport, mounts: MountsReport, *, log: Log) -> bool:
    """Record the restore (time, build id, what it used); whether it was recorded: never
    for the registry backend, nor in a read-only job (LAYERKEEP_CACHE_READ_ONLY)."""
    if settings.cache_backend != "dir" or cache_scope(settings).read_only:
        return False
    used = [image_key(t) for t in (*report.restored, *report.present)]
    used += [mount_key(m) for m in (*mounts.restored, *mounts.kept)]
    return record_use(settings.cache_dir, used, build_id=settings.build_id, kind="restored",
                      log=log)


def after_save(
    settings: Settings, outcome: SaveOutcome, mounts: MountsReport, *, log: Log
) -> BudgetReport | None:
    """Record what the save used, then keep to LAYERKEEP_CACHE_MAX_MB (folder backend)."""
    if settings.cache_backend != "dir":
        return None
    images = outcome.images
    used = [image_key(t) for t in (*images.saved, *images.unchanged)]
    used += [mount_key(m) for m in (*mounts.saved, *mounts.unchanged)]
    record_use(settings.cache_dir, used, build_id=settings.build_id, kind="saved", log=log)
    if not settings.cache_max_mb:
        return None
    return keep_within_budget(
        settings.cache_dir, settings.cache_max_mb * MB,
        written_images=images.saved, written_mounts=mounts.saved, log=log,
    )
