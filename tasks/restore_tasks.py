"""cache.load: restore saved images before anything needs them.

Before another task (image.build, services.up), a failure is a warning and the job
goes on: the cache is an optimisation. Run alone, a failure exits non-zero.
"""

from invoke.context import Context

from layerkeep.cache.backend import describe_load, load_cache
from layerkeep.cache.mounts import describe_mounts, restore_cache_mounts
from layerkeep.dryrun import load_plan

from .graph import Done, Note, engine, is_dry, resolved_builder, say_plan, settings, step
from .taskkit import environ, masked_log, meters

CACHE_HELP = {
    "cache_dir": "cache folder (default: LAYERKEEP_CACHE_DIR)",
    "backend": "dir or registry (default: LAYERKEEP_CACHE_BACKEND)",
}


@step("cache.load", help=CACHE_HELP, role="cache")
def load(c: Context, cache_dir: str | None = None, backend: str | None = None) -> Note:
    """Restore cached images the engine lacks (damaged entries are skipped)."""
    current = settings(c, cache_dir=cache_dir, cache_backend=backend)
    if is_dry(c):
        return say_plan(load_plan(current))
    connected, log = engine(c, current), masked_log(current)
    report = load_cache(connected, current, log=log, progress=meters())
    chosen = resolved_builder(c, current)
    mounts = restore_cache_mounts(connected, current, chosen, environ(), log=log)
    figures = {
        "restored": list(report.restored),
        "present": list(report.present),
        "failed": list(report.failed),
        "bytes_read": report.bytes_read,
        "cache_mounts_restored": list(mounts.restored),
    }
    note = describe_load(report)
    if not mounts.skipped:
        note += f"; {describe_mounts(mounts)}"
    return Done(note, figures)
