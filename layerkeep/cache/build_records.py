"""The build records (build.explain) beside a registry cache: one more tag, pushed and pulled.

The record image is ``<image>:<tag>-build-record`` locally and ``<cache repository>:<tag>-
build-record`` in the registry, next to the cache tags. A dir cache needs nothing here:
its records are a file in the cache folder. The records only sharpen the reasons a later
build gives for a miss, so a record that cannot be pushed or pulled is a warning.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from layerkeep.build.explain import record_image
from layerkeep.cache.registry_backend import cache_location
from layerkeep.core.engine import Engine
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.imageref import ImageRef
from layerkeep.core.registry import Sleep, TagNotFound, pull_tag, push_tag
from layerkeep.core.settings import Settings

Log = Callable[[str], None]


def push_build_records(
    engine: Engine, settings: Settings, *, log: Log, sleep: Sleep = time.sleep
) -> bool:
    """Push the local record image beside the cache tags; whether it was pushed."""
    local = record_image(settings)
    if local is None or engine.image_id(str(local)) is None:
        return False
    location = cache_location(settings)
    target = ImageRef(location.repository, local.tag)
    try:
        engine.tag_image(str(local), str(target))
        push_tag(
            engine, target, location.credentials,
            attempts=settings.push_retries, time_limit=settings.push_timeout,
            log=log, sleep=sleep,
        )
    except DockerOperationError as error:
        log(f"warning: build records not pushed, later misses may be unexplained: "
            f"{error.one_line()}")
        return False
    return True


def pull_build_records(
    engine: Engine, settings: Settings, *, log: Log, sleep: Sleep = time.sleep
) -> bool:
    """Pull the record image and name it where build.explain reads it; whether it came."""
    local = record_image(settings)
    if local is None:
        return False
    location = cache_location(settings)
    source = ImageRef(location.repository, local.tag)
    try:
        pull_tag(
            engine, source, location.credentials,
            attempts=settings.push_retries, time_limit=settings.push_timeout,
            log=log, sleep=sleep,
        )
        engine.tag_image(str(source), str(local))
    except TagNotFound:
        return False  # a cache saved before records existed
    except DockerOperationError as error:
        log(f"warning: build records not pulled, misses may be unexplained: {error.one_line()}")
        return False
    return True
