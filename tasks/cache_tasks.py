"""cache.save: keep what the next build needs (a folder, or a registry).

In `inv ci` a failure is a warning and the job goes on: the cache is an optimisation.
Run alone, a failure exits non-zero with one line.
"""

from invoke.context import Context

from layerkeep.cache.backend import save_cache
from layerkeep.cache.mounts import describe_mounts, save_cache_mounts
from layerkeep.dryrun import save_plan

from .graph import Done, Note, engine, is_dry, resolved_builder, say_plan, settings, step
from .image_tasks import build
from .restore_tasks import CACHE_FLAGS
from .taskkit import environ, masked_log, meters


@step("cache.save", pre=[build], flags=CACHE_FLAGS, role="cache")
def save(c: Context) -> Note:
    """Build, then save the app image, its stages and LAYERKEEP_CACHE_IMAGES."""
    current = settings(c)
    if is_dry(c):
        return say_plan(save_plan(current))
    connected, log = engine(c, current), masked_log(current)
    report = save_cache(connected, current, log=log, progress=meters())
    chosen = resolved_builder(c, current)
    mounts = save_cache_mounts(connected, current, chosen, environ(), log=log)
    figures = {
        "saved": list(report.saved),
        "unchanged": list(report.unchanged),
        "layers_written": report.layers_written,
        "bytes_written": report.bytes_written,
        "bytes_read": report.bytes_read,
        "engine_reads": report.engine_reads,
        "cache_mounts_saved": list(mounts.saved),
    }
    note = (
        "up to date"
        if report.skipped
        else f"{report.layers_written} layers, {report.bytes_written / 1e6:.1f} MB written"
    )
    if not mounts.skipped:
        note += f"; {describe_mounts(mounts)}"
    return Done(note, figures)
