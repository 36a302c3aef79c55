"""When each thing in the cache folder was last used, and the last restore: ``usage.json``.

cache.load records the images and cache mounts it restored or found present, with the
time and its build id (``last restored by``); cache.save records what it saved or found
unchanged. LAYERKEEP_CACHE_MAX_MB drops the least recently used first (cache.budget),
and cache.status shows it. A read-only job (LAYERKEEP_CACHE_READ_ONLY) writes nothing,
nor does a job whose cache folder is not writable; a damaged file counts as empty.
Written atomically under the cache folder's lock.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CacheUnavailable
from layerkeep.core.atomic import atomic_write
from layerkeep.core.log import Log

FILE = "usage.json"
FORMAT = "layerkeep-cache-usage/1"


@dataclass(frozen=True)
class Event:
    """A restore or a save: when, by which build, what."""

    at: float
    build_id: str
    items: tuple[str, ...] = ()


@dataclass
class Usage:
    """``used``: ``image:<tag>`` or ``mount:<id>`` -> when last used (epoch seconds)."""

    used: dict[str, float] = field(default_factory=dict)
    restored: Event | None = None
    saved: Event | None = None


def image_key(tag: str) -> str:
    """The usage key of a cached image."""
    return f"image:{tag}"


def mount_key(mount_id: str) -> str:
    """The usage key of a cache mount."""
    return f"mount:{mount_id}"


def read_usage(cache_dir: Path) -> Usage:
    """The folder's usage record; empty when there is none or it is damaged."""
    try:
        data = json.loads((cache_dir / FILE).read_text("utf-8"))
        if data.get("format") != FORMAT:
            return Usage()
        return Usage(
            {str(k): float(v) for k, v in data.get("used", {}).items()},
            _event(data.get("restored")),
            _event(data.get("saved")),
        )
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return Usage()


def record_use(
    cache_dir: Path, keys: Iterable[str], *, build_id: str, kind: str, log: Log,
    now: Callable[[], float] = time.time,
) -> bool:
    """Mark ``keys`` used now by ``build_id``, as a ``restored`` or ``saved`` event;
    whether it was written (a folder that is not there or not writable is left alone)."""
    cache = CacheDir(cache_dir)
    if not cache.exists() or not os.access(cache_dir, os.W_OK):
        return False  # nothing saved here yet, or a folder this job only reads
    try:
        with cache.locked():
            usage = read_usage(cache_dir)
            at = now()
            names = tuple(sorted(set(keys)))
            usage.used.update(dict.fromkeys(names, at))
            event = Event(at, build_id, names)
            if kind == "restored":
                usage.restored = event
            else:
                usage.saved = event
            atomic_write(cache_dir / FILE, _text(usage).encode(), mode=0o644)
    except CacheUnavailable as error:
        log(f"warning: cache usage not recorded: {error.one_line()}")
        return False
    except OSError as error:
        log(f"warning: cache usage not recorded in {cache_dir}: {error.strerror or error}")
        return False
    return True


def forget(cache_dir: Path, keys: Iterable[str]) -> None:
    """Drop ``keys`` from the record (what the budget removed); hold the folder's lock."""
    usage = read_usage(cache_dir)
    for key in keys:
        usage.used.pop(key, None)
    atomic_write(cache_dir / FILE, _text(usage).encode(), mode=0o644)


def _event(data: Any) -> Event | None:
    if not isinstance(data, dict):
        return None
    return Event(float(data["at"]), str(data.get("build_id", "")),
                 tuple(str(i) for i in data.get("items", [])))


def _text(usage: Usage) -> str:
    def event(item: Event | None) -> dict[str, Any] | None:
        return None if item is None else {
            "at": item.at, "build_id": item.build_id, "items": list(item.items)
        }

    return json.dumps(
        {"format": FORMAT, "used": dict(sorted(usage.used.items())),
         "restored": event(usage.restored), "saved": event(usage.saved)},
        indent=1,
    )
