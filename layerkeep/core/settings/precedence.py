"""Where a setting's text came from, and which place wins: precedence in one place.

Lowest first (the order of :class:`Source`): built-in defaults < env files < the
process environment < task flags; among env files, a later file wins (see env_files).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class Source(IntEnum):
    """Where a value came from; a higher source overrides a lower one."""

    DEFAULT = 0
    ENV_FILE = 1
    ENVIRONMENT = 2
    FLAG = 3


class Raw(NamedTuple):
    """A setting's text as written, where it was written, and that place's precedence."""

    text: str
    where: str
    source: Source


def put(raw: dict[str, Raw], key: str, value: Raw) -> None:
    """Record ``value`` unless a higher source already set the key."""
    current = raw.get(key)
    if current is None or value.source >= current.source:
        raw[key] = value
