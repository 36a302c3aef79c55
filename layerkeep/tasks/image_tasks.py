"""image.*: build the app image with every cached image as --cache-from."""

from invoke.context import Context

from layerkeep.building.explain import miss_files
from layerkeep.cache.backend import build_with_cache
from layerkeep.dryrun import build_plan

from .cache_load_tasks import load
from .git_tasks import touch
from .graph import Done, Note, engine, is_dry, resolved_builder, say_plan, settings, step
from .taskkit import environ, masked_log


@step("image.build", pre=[touch, load], flags=["--builder", "--image"])
def build(c: Context) -> Note:
    """Build the app image (and its named stages), reusing cached layers."""
    current = settings(c)
    if is_dry(c):
        return say_plan(build_plan(current))
    connected = engine(c, current)
    chosen = resolved_builder(c, current)
    report = build_with_cache(connected, current, chosen, environ(), log=masked_log(current))
    figures = {
        "builder": chosen.kind,
        "steps_reused": report.tally.reused,
        "steps_total": report.tally.total,
        "images": [str(image) for image in report.images],
        "cache_from": list(report.cache_from),
        "reuse": report.reuse,
        "bytes_freed": report.bytes_freed,
        "miss_reasons": list(report.miss_reasons),
        # The lines name a few changed files each; these are all of them, per stage.
        "miss_files": miss_files(report.miss_reasons),
    }
    note = f"{report.tally.reused}/{report.tally.total} steps reused ({chosen.kind})"
    if report.bytes_freed:
        note += f", {report.bytes_freed / 1e6:.0f} MB freed"
    return Done(note, figures)
