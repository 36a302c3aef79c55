"""The images a build replaced: removed once nothing tags or uses them."""

from __future__ import annotations

from collections.abc import Sequence

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ResourceConflict
from layerkeep.core.log import Log


def remove_replaced(engine: Engine, replaced: Sequence[str], log: Log) -> int | None:
    """Remove the images this build untagged (the app's and stages' previous ones) that
    nothing else names or uses; the bytes of layers the engine freed, None when the
    engine could not tell (busy with another job's disk-usage query: a figure only)."""
    before = engine.layers_size()
    removed = 0
    for image_id in dict.fromkeys(replaced):
        if _remove_if_unused(engine, image_id):
            removed += 1
            log(f"removed {image_id[:19]}, which this build replaced")
    if not removed:
        return 0
    after = engine.layers_size() if before is not None else None
    if before is None or after is None:
        log(f"{removed} replaced image(s) removed (freed: unknown, the engine was busy)")
        return None
    # Another job's build may add layers meanwhile: never report less than nothing.
    freed = max(before - after, 0)
    log(f"{removed} replaced image(s) removed, {freed / 1e6:.1f} MB freed")
    return freed


def _remove_if_unused(engine: Engine, image_id: str) -> bool:
    """Remove an image a build untagged, unless a tag, a container or a child uses it."""
    attrs = engine.image_attrs(image_id)
    if attrs is None or attrs.get("RepoTags"):
        return False
    try:
        return engine.remove_image(image_id)
    except ResourceConflict:
        return False  # a container or a child image still uses it: the engine keeps it
