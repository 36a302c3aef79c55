"""BuildKit's inline cache records: coverage, and completing an image's from donors.

The configs here have the shape BuildKit 0.8 and 0.13 write (checked against images
built by both); tests/test_cache_chain.py checks the result on real engines.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from layerkeep.building.inline_cache import (
    CACHE_KEY,
    complete,
    covered_layers,
    has_inline_cache,
    records,
    uncovered_layers,
)

BASE = ["sha256:b0", "sha256:b1"]


def config(layers: list[str], cache: list[dict[str, Any]] | None) -> dict[str, Any]:
    rootfs = {"type": "layers", "diff_ids": layers}
    made: dict[str, Any] = {"architecture": "amd64", "rootfs": rootfs}
    if cache is not None:
        made[CACHE_KEY] = base64.b64encode(json.dumps(cache).encode()).decode()
    return made


def chain(results: dict[str, int | None]) -> list[dict[str, Any]]:
    """Records k0 -> k1 -> ..., each with its result layer (None: no result)."""
    made: list[dict[str, Any]] = []
    for position, (key, layer) in enumerate(results.items()):
        record: dict[str, Any] = {"digest": key}
        if position:
            record["inputs"] = [[{"link": position - 1}]]
        if layer is not None:
            record["layers"] = [{"layer": layer, "createdAt": "2026-12-06T00:00:00Z"}]
        made.append(record)
    return made


COLD = config([*BASE, "sha256:a", "sha256:b", "sha256:c"], chain({"k1": 2, "k2": 3, "k3": 4}))
# Built from COLD's cache with the last step changed: BuildKit 0.13 kept only the result
# of the step it ran.
IMPORTED = config(
    [*BASE, "sha256:a", "sha256:b", "sha256:d"], chain({"k1": None, "k2": None, "k4": 4})
)


def test_a_cold_build_covers_every_layer_it_made() -> None:
    assert covered_layers(COLD) == {2, 3, 4}
    assert uncovered_layers(COLD, 2) == []


def test_a_build_from_an_imported_cache_covers_only_what_it_ran() -> None:
    assert covered_layers(IMPORTED) == {4}
    assert uncovered_layers(IMPORTED, 2) == [2, 3]


def test_completing_takes_the_donors_results_over_the_same_layers() -> None:
    done = complete(IMPORTED, [COLD])
    assert uncovered_layers(done, 2) == []
    by_key = {r["digest"]: r for r in records(done)}
    assert [r["layer"] for r in by_key["k1"]["layers"]] == [2]
    assert [r["layer"] for r in by_key["k4"]["layers"]] == [4]
    assert done["rootfs"] == IMPORTED["rootfs"]


def test_a_donor_result_over_other_layers_is_not_taken() -> None:
    # Same keys, but the donor's layer 2 is another layer: its result is not this image's.
    other = config([*BASE, "sha256:x", "sha256:b", "sha256:c"], chain({"k1": 2, "k2": 3}))
    done = complete(IMPORTED, [other])
    assert covered_layers(done) == {4}


def test_a_donor_record_with_another_key_is_not_taken() -> None:
    other = config(COLD["rootfs"]["diff_ids"], chain({"z1": 2, "z2": 3}))
    assert complete(IMPORTED, [other]) == IMPORTED


def test_chained_results_are_taken_when_their_layers_match() -> None:
    chained = [{"digest": "k2", "chains": [{"layers": [0, 1, 3]}]}]
    donor = config(COLD["rootfs"]["diff_ids"], chained)
    done = complete(IMPORTED, [donor])
    assert 3 in covered_layers(done)


def test_an_image_without_inline_cache_is_left_as_it_is() -> None:
    plain = config(BASE, None)
    assert not has_inline_cache(plain)
    assert complete(plain, [COLD]) == plain
    assert covered_layers(plain) == set()


def test_junk_in_the_cache_key_reads_as_no_cache() -> None:
    assert records({CACHE_KEY: "not base64!"}) == []
    assert records({CACHE_KEY: base64.b64encode(b'{"x": 1}').decode()}) == []
    assert records({CACHE_KEY: base64.b64encode(b'{"records": [{"digest": "k"}]}').decode()}) == [
        {"digest": "k"}
    ]
