"""The build records (building.build_records) travel with the cache: saved beside it, read back.

- dir backend: ``write_records_file`` puts the records this engine keeps (and those the
  folder had) into ``build-records.json`` in the cache folder, after a save succeeded,
  atomically: a failed save leaves the folder as it was.
- registry backend: the record image ``<image>:<tag>-build-record`` is pushed as
  ``<cache repository>:<scope>--<tag>-build-record``, next to the cache tags, in the
  branch's scope (never by a read-only build), and pulled back from the branch's scope,
  else the fallback branch's.

The records only sharpen the reasons a later build gives for a miss, so a record that
cannot be written, pushed or pulled is a warning.
"""

from __future__ import annotations

import time

from layerkeep.building.build_records import RECORDS_FILE, kept_records, record_image, records_text
from layerkeep.cache.registry_backend import cache_location, cache_scope
from layerkeep.cache.store import CacheDir
from layerkeep.core.atomic import atomic_write
from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.imageref import ImageRef
from layerkeep.core.log import Log
from layerkeep.core.registry import pull_tag, push_tag
from layerkeep.core.registry_failures import Retries, Sleep, TagNotFound
from layerkeep.core.settings import Settings


def write_records_file(engine: Engine, settings: Settings, *, log: Log) -> bool:
    """Write the build records into the cache folder; whether it was written."""
    records = kept_records(engine, settings, log=log)
    if not records:
        return False
    cache = CacheDir(settings.cache_dir)
    folder = cache.root
    try:
        # Under the cache's lock: another job's save waits, and removes what an
        # interrupted write left.
        with cache.locked():
            atomic_write(folder / RECORDS_FILE, records_text(records).encode(), mode=0o644)
    except OSError as error:
        log(f"warning: build records not saved in {folder}: {error.strerror or error}")
        return False
    return True


def push_build_records(
    engine: Engine, settings: Settings, *, log: Log, sleep: Sleep = time.sleep
) -> bool:
    """Push the local record image beside the cache tags, in this branch's scope (none for
    a read-only cache); whether it was pushed."""
    local = record_image(settings)
    scope = cache_scope(settings)
    if local is None or scope.read_only or engine.image_id(str(local)) is None:
        return False
    location = cache_location(settings)
    target = ImageRef(location.repository, scope.tag(local.tag))
    try:
        engine.tag_image(str(local), str(target))
        push_tag(engine, target, location.credentials, Retries.of(settings, log, sleep))
    except DockerOperationError as error:
        log(
            f"warning: build records not pushed, later misses may be unexplained: "
            f"{error.one_line()}"
        )
        return False
    return True


def pull_build_records(
    engine: Engine, settings: Settings, *, log: Log, sleep: Sleep = time.sleep
) -> bool:
    """Pull the record image (this branch's scope, else the fallback branch's) and name it
    where building.build_records reads it; whether it came."""
    local = record_image(settings)
    if local is None:
        return False
    location = cache_location(settings)
    for tag in cache_scope(settings).sources(local.tag):
        source = ImageRef(location.repository, tag)
        try:
            pull_tag(engine, source, location.credentials, Retries.of(settings, log, sleep))
        except TagNotFound:
            continue  # not saved in this scope (or before records existed)
        except DockerOperationError as error:
            log(f"warning: build records not pulled, misses may be unexplained: {error.one_line()}")
            return False
        engine.tag_image(str(source), str(local))
        return True
    return False
