"""cache.load: restore saved images before anything needs them.

Before another task (image.build, services.up), a failure is a warning and the job
goes on: the cache is an optimisation. Run alone, a failure exits non-zero.
"""

from invoke.context import Context

from layerkeep.cache.backend import describe_load, load_cache
from layerkeep.cache.mount_store import describe_mounts, restore_cache_mounts
from layerkeep.cache.upkeep import after_load
from layerkeep.dryrun import load_plan

from .graph import Done, Note, engine, is_dry, resolved_builder, say_plan, settings, step
from .taskkit import environ, masked_log, meters

CACHE_FLAGS = ["--cache-dir", "--backend"]


@step("cache.load", flags=CACHE_FLAGS, role="cache")
def load(c: Context) -> Note:
    """Restore cached images the engine lacks (damaged entries are skipped)."""
    current = settings(c)
    if is_dry(c):
        return say_plan(load_plan(current))
    connected, log = engine(c, current), masked_log(current)
    chosen = resolved_builder(c, current)
    report = load_cache(
        connected, current, chosen, log=log, progress=meters(), environ=environ()
    )
    mounts = restore_cache_mounts(connected, current, chosen, environ(), log=log)
    after_load(current, report, mounts, log=log)
    figures = {
        "restored": list(report.restored),
        "present": list(report.present),
        "failed": list(report.failed),
        "bytes_read": report.bytes_read,
        "cache_mounts_restored": list(mounts.restored),
    }
    note = describe_load(report, chosen)
    if not mounts.skipped:
        note += f"; {describe_mounts(mounts)}"
    return Done(note, figures)
