"""Docker image references: parsing and validation, per the distribution grammar."""

from __future__ import annotations

import re
from dataclasses import dataclass

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_LABEL}(?:\.{_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
# ASCII classes only: Python's \w also matches "é", which Docker rejects.
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_REFERENCE = re.compile(
    rf"(?P<repo>(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*)(?::(?P<tag>{_TAG}))?"
    r"(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)
_VALID_TAG = re.compile(_TAG)


@dataclass(frozen=True)
class ImageRef:
    """A repository with a tag; ``str()`` gives ``repo:tag``."""

    repository: str
    tag: str = "latest"

    def __str__(self) -> str:
        return f"{self.repository}:{self.tag}"

    def with_tag(self, tag: str) -> ImageRef:
        """The same repository under another tag."""
        return ImageRef(self.repository, tag)


def parse_image_ref(text: str) -> ImageRef | None:
    """Parse ``[registry/]path[:tag]``; None when it is not a valid reference."""
    match = _REFERENCE.fullmatch(text)
    if match is None or len(match["repo"]) > 255 or match["digest"]:
        return None
    return ImageRef(match["repo"], match["tag"] or "latest")


def is_valid_tag(tag: str) -> bool:
    """Whether ``tag`` is a tag Docker accepts."""
    return bool(_VALID_TAG.fullmatch(tag))
