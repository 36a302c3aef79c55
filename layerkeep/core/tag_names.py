"""Docker tags made from any name: a branch, a git tag, an image."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Collection

from layerkeep.core.imageref import is_valid_tag

TAG_MAX = 128
_NOT_IN_TAG = re.compile(r"[^a-z0-9_.-]+")
_DASHES = re.compile(r"-{2,}")
_HASH_LENGTH = 10
# What safe_tag appends to a name it changed; a valid name that already ends so is
# changed too, so that it cannot meet another name's hashed tag.
_HASHED = re.compile(rf"-[0-9a-f]{{{_HASH_LENGTH}}}\Z")


def safe_tag(
    name: str,
    *,
    empty_prefix: str = "branch",
    always_hash: bool = False,
    limit: int = TAG_MAX,
    reserved: Collection[str] = ("latest",),
) -> str:
    """A valid Docker tag for any name (a branch, a git tag, an image); two names never share one.

    A name that is already a valid tag of at most ``limit`` characters stays as it is
    (``main``, ``v1.2.0``, ``Feature-A``). Any other name is made valid and readable:
    accents transliterated (``é`` -> ``e``), lowercased, each run of other characters one
    ``-``, no leading or trailing ``.``/``-``, shortened to fit; and since that changed
    it, ``-`` and 10 hex digits of the SHA-256 of the original name are appended:
    ``feature/a`` -> ``feature-a-951d42dc02``, ``Feature/A`` -> ``feature-a-<another>``.
    A name without a usable character becomes ``<empty_prefix>-<hash>``. A valid name
    in ``reserved`` (any case: ``latest``), a valid one that already ends like a hashed
    tag, or any name with ``always_hash``, is hashed too; so distinct names get distinct
    tags (short of a 40-bit hash collision), and the same name always the same tag.
    """
    if (
        not always_hash
        and len(name) <= limit
        and is_valid_tag(name)
        and name.lower() not in {word.lower() for word in reserved}
        and not _HASHED.search(name)
    ):
        return name
    decomposed = unicodedata.normalize("NFKD", name)
    ascii_text = decomposed.encode("ascii", "ignore").decode()
    slug = _DASHES.sub("-", _NOT_IN_TAG.sub("-", ascii_text.lower())).strip(".-")
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:_HASH_LENGTH]
    slug = slug[: limit - _HASH_LENGTH - 1].rstrip(".-")
    return f"{slug or empty_prefix}-{digest}"
