"""Secrets in output: which variable names hold one, and the one masker that hides them.

Every secret a job knows (passwords, tokens, ``LAYERKEEP_SECRETS``, secret-named
variables) is replaced by :data:`MASK` in whatever layerkeep prints, logs or raises,
in each form it may take there: as written, URL-quoted, and inside a Basic auth header.
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from urllib.parse import quote

MASK = "****"
# A variable whose name contains one of these is a secret, without being listed.
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "KEY")


def is_secret_name(name: str, listed: Collection[str]) -> bool:
    """Whether the variable ``name`` holds a secret: listed in LAYERKEEP_SECRETS, or named so."""
    return name in listed or any(marker in name.upper() for marker in SECRET_MARKERS)


@dataclass(frozen=True)
class Masker:
    """Replaces every known secret, in each form it may take in output, by MASK."""

    values: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, secrets: Iterable[str], *, logins: Iterable[tuple[str, str]] = ()) -> Masker:
        """Mask ``secrets`` plain and URL-quoted, and each (user, password) as Basic auth."""
        found: set[str] = set()
        for value in secrets:
            found.update((value, quote(value, safe=""), quote(value)))
        for user, password in logins:
            if password:
                found.add(base64.b64encode(f"{user}:{password}".encode()).decode())
        return cls(_longest_first(found))

    def plus(self, secrets: Iterable[str]) -> Masker:
        """This masker with more values (their quoted forms too)."""
        return Masker(_longest_first({*self.values, *Masker.of(secrets).values}))

    def mask(self, text: str) -> str:
        """``text`` with every secret replaced."""
        for value in self.values:
            text = text.replace(value, MASK)
        return text


def _longest_first(values: set[str]) -> tuple[str, ...]:
    # Longest first, so that a secret containing another is hidden whole.
    return tuple(sorted(values - {""}, key=lambda value: (-len(value), value)))
