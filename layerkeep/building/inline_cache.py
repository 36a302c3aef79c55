"""BuildKit's inline cache: which layers of an image it covers, and putting back lost ones.

An image built with ``BUILDKIT_INLINE_CACHE=1`` carries its build's cache records in
its config (``moby.buildkit.cache.v0``, base64 of a JSON list): each step's cache key,
the keys it was made from, and, for a step whose result is a prefix of the image's
layers, that result as a layer index (or, for a result whose layers are not a prefix, a
``chains`` list of indexes). A later build given the image as ``--cache-from`` reuses a
step only when its record carries such a result.

A build that reused steps from an imported cache records no result for them (BuildKit
0.13, Docker 23+; moby/buildkit#3660): saved as it is, the next machine reuses only what
the machine before rebuilt, so every other commit misses. :func:`complete` puts those
results back from donor images (the cached images the build was given): a donor's
result is taken for a record with the same cache key when the donor's layers it names
are the image's own, at the same places.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Mapping
from typing import Any

CACHE_KEY = "moby.buildkit.cache.v0"

Record = dict[str, Any]


def records(config: Mapping[str, Any]) -> list[Record]:
    """The inline cache records of an image config; [] when it carries none (or junk)."""
    raw = config.get(CACHE_KEY)
    if not isinstance(raw, str) or not raw:
        return []
    try:
        decoded = json.loads(base64.b64decode(raw, validate=True))
    except (binascii.Error, ValueError):
        return []
    found = decoded.get("records") if isinstance(decoded, dict) else decoded
    if not isinstance(found, list):
        return []
    return [record for record in found if isinstance(record, dict)]


def has_inline_cache(config: Mapping[str, Any]) -> bool:
    """Whether the image was built with inline cache metadata at all."""
    return bool(records(config))


def covered_layers(config: Mapping[str, Any]) -> set[int]:
    """Indexes of the image's layers that some record's result ends at: the steps a
    build given this image can reuse."""
    covered: set[int] = set()
    for record in records(config):
        covered.update(_result_tops(record))
    return covered


def uncovered_layers(config: Mapping[str, Any], first: int) -> list[int]:
    """The layers from ``first`` on (the build's own, above its base) no record covers."""
    covered = covered_layers(config)
    return [index for index in range(first, len(_diff_ids(config))) if index not in covered]


def complete(config: Mapping[str, Any], donors: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """``config`` with the results its records lack taken from ``donors``' records.

    Only results over layers the image has at the same places are taken; the rest of the
    config is untouched. Returns ``config`` itself (as a new dict) when nothing was added.
    """
    own = records(config)
    if not own:
        return dict(config)
    layers = _diff_ids(config)
    by_key = {str(record.get("digest")): record for record in own}
    added = False
    for donor in donors:
        donor_layers = _diff_ids(donor)
        for record in records(donor):
            mine = by_key.get(str(record.get("digest")))
            if mine is None:
                continue
            for result in record.get("layers") or []:
                index = result.get("layer") if isinstance(result, dict) else None
                if (
                    isinstance(index, int)
                    and 0 <= index < len(layers)
                    and donor_layers[: index + 1] == layers[: index + 1]
                    and index not in _result_tops(mine)
                ):
                    mine.setdefault("layers", []).append(result)
                    added = True
            for chain in record.get("chains") or []:
                indexes = chain.get("layers") if isinstance(chain, dict) else None
                if (
                    isinstance(indexes, list)
                    and indexes
                    and all(_same_layer(i, donor_layers, layers) for i in indexes)
                    and chain not in (mine.get("chains") or [])
                ):
                    mine.setdefault("chains", []).append(chain)
                    added = True
    result = dict(config)
    if added:
        result[CACHE_KEY] = base64.b64encode(
            json.dumps(own, separators=(",", ":")).encode()
        ).decode()
    return result


def _result_tops(record: Mapping[str, Any]) -> set[int]:
    """The top layer of each result of a record (a result is the layers up to it)."""
    found: set[int] = set()
    for result in record.get("layers") or []:
        if isinstance(result, dict) and isinstance(result.get("layer"), int):
            found.add(result["layer"])
    for chain in record.get("chains") or []:
        indexes = chain.get("layers") if isinstance(chain, dict) else None
        if isinstance(indexes, list) and indexes and isinstance(indexes[-1], int):
            found.add(indexes[-1])
    return found


def _same_layer(index: object, donor: list[str], own: list[str]) -> bool:
    return isinstance(index, int) and 0 <= index < min(len(donor), len(own)) and (
        donor[index] == own[index]
    )


def _diff_ids(config: Mapping[str, Any]) -> list[str]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, Mapping) else None
    return [str(each) for each in ids] if isinstance(ids, list) else []
