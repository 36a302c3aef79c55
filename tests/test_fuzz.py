"""Fuzz the parsers of user input: each case gives a valid result or a one-line ConfigError.

hypothesis is not a dependency, so these are seeded random loops: a failure names its seed
and case, and reruns the same way.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from layerkeep.core.ci_vars import GitFacts, safe_build_id
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import is_valid_tag, parse_image_ref
from layerkeep.core.settings import KEYS, load_settings, read_env_file
from layerkeep.core.values import (
    Invalid,
    parse_bool,
    parse_number,
    parse_pairs,
    parse_port,
    parse_whole_number,
)

SEED = 20261127
CASES = 3000
NO_GIT = GitFacts(commit="", branch="")
# Pieces that reach the parsers' corners: quoting, interpolation, escapes, comments,
# line ends, a byte-order mark, non-ASCII letters and digits, and bytes that are not UTF-8.
BYTE_PIECES = [
    b"=", b"'", b'"', b"\\", b"${", b"}", b":-", b"#", b" ", b"\t", b"\n", b"\r\n", b"\r",
    b"export ", b"\xef\xbb\xbf", b"\x00", b"\xff", b"\xe9", b"\xc3", b"\xc3\xa9", b"\xb2",
    b"\xc2\xb2", b"\xd9\xa1", b"LAYERKEEP_", b"IMAGE", b"A", b"a1", b"app:dev", b",",
]
TEXT_PIECES = [
    "a", "Z", "0", "9", "-", "_", ".", ":", "/", "@", ",", "=", " ", "\n", "\t", "\\,",
    "sha256:", "\u00e9", "\u00b2", "\u0661", "\uff44", "\u202e", "\ud800", "latest", "my-org",
    "127.0.0.1:5000", "[::1]", "{postgres.url}", "${X}", "'", '"', "x" * 130,
]
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def seeded(offset: int) -> random.Random:
    """A reproducible generator: repeatability, not unpredictability, is the point here."""
    return random.Random(SEED + offset)  # noqa: S311


def random_bytes(rng: random.Random) -> bytes:
    if rng.random() < 0.3:
        return rng.randbytes(rng.randrange(0, 80))
    return b"".join(rng.choice(BYTE_PIECES) for _ in range(rng.randrange(0, 25)))


def random_text(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return "".join(chr(rng.randrange(0, 0x3000)) for _ in range(rng.randrange(0, 20)))
    return "".join(rng.choice(TEXT_PIECES) for _ in range(rng.randrange(0, 8)))


def test_env_files_of_random_bytes(tmp_path: Path) -> None:
    rng = seeded(0)
    env = tmp_path / ".env"
    refusals: list[tuple[bytes, str]] = []
    parsed = 0
    for number in range(CASES):
        data = random_bytes(rng)
        env.write_bytes(data)
        try:
            values = read_env_file(env, {"X": "from-environment"})
        except ConfigError as error:
            refusals.append((data, error.one_line()))
            continue
        parsed += 1
        for key, (value, where) in values.items():
            assert isinstance(key, str), (number, data)
            assert isinstance(value, str), (number, data)
            assert where.startswith(f"{env}:"), (number, data)
    # Both paths were taken, so the loop tested something.
    assert min(parsed, len(refusals)) > CASES // 10, (parsed, len(refusals))
    for data, message in refusals:
        assert message.startswith(str(env)), (data, message)
        assert "\n" not in message, (data, message)


def test_settings_from_random_env_files(tmp_path: Path) -> None:
    rng = seeded(1)
    names = [key.name for key in KEYS] + ["LAYERKEEP_POSTGRES_PORT", "LAYERKEEP_REDIS_ENV"]
    refusals: list[tuple[bytes, str]] = []
    loaded = 0
    for number in range(CASES):
        lines = [
            f"{rng.choice(names)}={random_text(rng)}".encode("utf-8", "surrogatepass")
            if rng.random() < 0.8
            else random_bytes(rng)
            for _ in range(rng.randrange(1, 4))
        ]
        data = b"\n".join(lines)
        (tmp_path / "layerkeep.env").write_bytes(data)
        try:
            settings = load_settings(tmp_path, {}, git_facts=lambda _: NO_GIT)
        except ConfigError as error:
            refusals.append((data, error.one_line()))
            continue
        assert SAFE_ID.fullmatch(settings.build_id), (number, data)
        loaded += 1
    assert min(loaded, len(refusals)) > CASES // 20, (loaded, len(refusals))
    for data, message in refusals:
        assert "LAYERKEEP_" in message or str(tmp_path) in message, (data, message)
        assert "\n" not in message, (data, message)


def test_references_tags_and_build_ids_of_random_text() -> None:
    rng = seeded(2)
    valid = 0
    for number in range(CASES):
        text = random_text(rng)
        image = parse_image_ref(text)
        if image is not None:
            valid += 1
            assert text.isascii(), (number, text)
            assert parse_image_ref(str(image)) == image, (number, text)
        if is_valid_tag(text):
            assert text.isascii(), (number, text)
            assert len(text) <= 128, (number, text)
        build_id = safe_build_id(text)
        assert SAFE_ID.fullmatch(build_id) or text == build_id == "", (number, text)
    assert valid > 0


@pytest.mark.parametrize(
    "parse",
    [
        lambda text: parse_whole_number(text, 0, 10**7),
        parse_port,
        lambda text: parse_number(text, 1, 3600),
        parse_pairs,
        parse_bool,
    ],
    ids=["whole_number", "port", "number", "pairs", "bool"],
)
def test_value_parsers_of_random_text(parse: Callable[[str], object]) -> None:
    rng = seeded(3)
    refusals: list[tuple[str, str]] = []
    for _ in range(CASES):
        text = random_text(rng)
        try:
            parse(text)
        except Invalid as error:
            refusals.append((text, str(error)))
    assert refusals
    for text, message in refusals:
        assert message, text
        assert "\n" not in message, (text, message)
