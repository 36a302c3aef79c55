"""Parsers for setting values: each returns the typed value or raises Invalid."""

from __future__ import annotations

import re

_PAIR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# ASCII only: str.isdigit() accepts superscripts and other scripts' digits, which int()
# then rejects or misreads.
_WHOLE = re.compile(r"[0-9]{1,18}")
_DECIMAL = re.compile(r"[0-9]{1,18}(?:\.[0-9]{1,18})?")
_SIZE = re.compile(r"([0-9]{1,18}(?:\.[0-9]{1,9})?)\s*(?:([kmgt])(i?))?b?", re.IGNORECASE)
_SIZE_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class Invalid(ValueError):
    """A value a parser rejects; its text says what is allowed.

    ``suffix`` names the part of a compound setting at fault (e.g. a service's IMAGE).
    """

    def __init__(self, message: str, *, suffix: str = "") -> None:
        super().__init__(message)
        self.suffix = suffix


def parse_list(value: str) -> tuple[str, ...]:
    """Comma-separated items, blanks dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def parse_pairs(value: str) -> dict[str, str]:
    """``A=1,B=two`` -> {"A": "1", "B": "two"}; a comma inside a value is written ``\\,``."""
    pairs = [part.replace("\0", ",").strip() for part in value.replace("\\,", "\0").split(",")]
    pairs = [pair for pair in pairs if pair]
    for number, pair in enumerate(pairs, 1):
        if not _PAIR.match(pair):
            # The position, not the text: a value may be a secret.
            raise Invalid(f"item {number} is not NAME=value; write comma-separated NAME=value")
    return dict(pair.split("=", 1) for pair in pairs)


def parse_whole_number(value: str, low: int, high: int) -> int:
    """A whole number within [low, high], written in ASCII digits."""
    text = value.strip()
    if not _WHOLE.fullmatch(text) or not low <= int(text) <= high:
        raise Invalid(f"use a whole number from {low} to {high}")
    return int(text)


def parse_port(value: str) -> int | None:
    """A TCP port, or None when empty."""
    text = value.strip()
    if not text:
        return None
    if not _WHOLE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise Invalid("use a port number from 1 to 65535")
    return int(text)


def parse_bool(value: str) -> bool:
    """yes/no, true/false, on/off, 1/0."""
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise Invalid("use yes or no")


def parse_number(value: str, low: float, high: float) -> float:
    """A number within [low, high], written in ASCII digits with an optional fraction."""
    text = value.strip()
    number = float(text) if _DECIMAL.fullmatch(text) else low - 1
    if not low <= number <= high:
        raise Invalid(f"use a number from {low:g} to {high:g}")
    return number


def parse_size(value: str) -> int:
    """A size in bytes: ``500MB``, ``2GB``, ``1.5G``, ``0``; ``KiB``..``TiB`` are powers of 1024."""
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise Invalid("write a size such as 500MB or 2GB")
    unit = (1024 if match[3] else 1000) ** _SIZE_POWERS[match[2].lower()] if match[2] else 1
    return int(float(match[1]) * unit)
