"""The build line never credits a restore with hits the engine made itself."""

from __future__ import annotations

from layerkeep.building.output import ReuseSource, StepTally


def tally(reused: int, total: int) -> StepTally:
    steps = StepTally()
    for number in range(total):
        steps.record(f"step {number}", number < reused)
    return steps


def test_hits_with_nothing_cached_are_the_engines_own() -> None:
    line = ReuseSource("buildkit", images=0, engine_entries=12).describe(tally(16, 16))
    assert line == (
        "cache: 16/16 steps reused, from this engine's own build cache: no cached image was used"
    )


def test_hits_on_an_engine_with_no_cache_of_its_own_come_from_the_images() -> None:
    assert ReuseSource("buildkit", 2, 0).describe(tally(9, 9)) == (
        "cache: 9/9 steps reused, from the inline cache of 2 cached image(s)"
    )
    assert ReuseSource("legacy", 2, 0).describe(tally(15, 15)).endswith(
        "from the history of 2 cached image(s)"
    )


def test_a_long_lived_engine_cannot_prove_the_restore_worked() -> None:
    line = ReuseSource("buildkit", 2, 35).describe(tally(9, 9))
    assert line.endswith(
        "from the inline cache of 2 cached image(s) or this engine's own build cache "
        "(35 entries before this build)"
    )


def test_cached_images_that_matched_nothing_are_a_warning() -> None:
    source = ReuseSource("buildkit", 2, 0)
    assert source.describe(tally(0, 9)) == "cache: 0/9 steps reused"
    warning = source.warning(tally(0, 9))
    assert warning is not None
    assert "another Docker version's BuildKit" in warning
    assert source.warning(tally(3, 9)) is None
    assert ReuseSource("buildkit", 0, 0).warning(tally(0, 9)) is None
    legacy = ReuseSource("legacy", 1, 0).warning(tally(0, 4))
    assert legacy is not None
    assert "classic builder" in legacy


def test_an_engine_that_cannot_tell_its_cache_size_still_gets_an_honest_line() -> None:
    line = ReuseSource("buildkit", images=2, engine_entries=None).describe(tally(9, 9))
    assert line.endswith(
        "from the inline cache of 2 cached image(s) or this engine's own build cache"
    )
