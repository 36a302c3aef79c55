"""Progress of long work (saving, loading, pulling, pushing, building) a person can follow.

On a terminal a tqdm bar redraws in place (bytes with their rate, or steps). Anywhere
else (a CI log) a plain line comes at most every ``interval`` seconds, and a last one
when the work ends: never a wall of carriage returns.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Literal, Protocol, TextIO

from tqdm import tqdm

Unit = Literal["B", "steps"]
PLAIN_INTERVAL = 5.0


class Meter(Protocol):
    """Counts the progress of one piece of work."""

    def advance(self, amount: int = 1) -> None:
        """``amount`` more bytes (or steps) are done."""

    def close(self) -> None:
        """The work ended: the last figure is shown."""


MeterFactory = Callable[[str, int | None, Unit], Meter]


class _Silent:
    def advance(self, amount: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def silent(label: str, total: int | None = None, unit: Unit = "B") -> Meter:
    """A meter that shows nothing: the default of library functions."""
    return _Silent()


def _amount(value: float, unit: Unit) -> str:
    if unit == "steps":
        return f"{int(value)} steps"
    return f"{value / 1e6:.1f} MB"


class PlainMeter:
    """A line every ``interval`` seconds and, when there was one, a last one at the end:
    work done within ``interval`` prints nothing (its caller says what it did)."""

    def __init__(
        self,
        label: str,
        total: int | None,
        unit: Unit,
        *,
        stream: TextIO,
        interval: float = PLAIN_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.unit = label, total, unit
        self.stream, self.interval, self.clock = stream, interval, clock
        self.done = 0
        self.started = self.last = clock()
        self.closed = False
        self.lines = 0

    def advance(self, amount: int = 1) -> None:
        """Count ``amount``; print a line when ``interval`` has passed since the last."""
        self.done += amount
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def close(self) -> None:
        """Print the final line once, if a line came before it."""
        if not self.closed and self.lines:
            self._line(self.clock(), final=True)
        self.closed = True

    def _line(self, now: float, *, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        text = f"{self.label}: {_amount(self.done, self.unit)}"
        if self.total:
            text += f" of {_amount(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        if self.unit == "B":
            text += f", {self.done / elapsed / 1e6:.1f} MB/s"
        if final:
            text += f", done in {elapsed:.1f} s"
        self.lines += 1
        print(text, file=self.stream, flush=True)

    def __enter__(self) -> PlainMeter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BarMeter:
    """A tqdm bar on a terminal, redrawn in place and left on screen when done."""

    def __init__(self, label: str, total: int | None, unit: Unit, *, stream: TextIO) -> None:
        size = shutil.get_terminal_size()
        self.bar = tqdm(
            total=total,
            desc=label,
            unit="B" if unit == "B" else " steps",
            unit_scale=unit == "B",
            unit_divisor=1000,
            file=stream,
            # A terminal that reports no size (some CI ptys) still gets a bar: tqdm
            # would draw nothing in 0 rows.
            ncols=size.columns or 80,
            nrows=size.lines or 24,
            mininterval=0.2,
        )

    def advance(self, amount: int = 1) -> None:
        """Count ``amount``; tqdm redraws at most five times a second."""
        self.bar.update(amount)

    def close(self) -> None:
        """Leave the last state of the bar on screen."""
        self.bar.close()


def for_stream(stream: TextIO | None = None, *, interval: float = PLAIN_INTERVAL) -> MeterFactory:
    """Meters for ``stream`` (default stderr): bars on a terminal, plain lines elsewhere."""
    target = stream if stream is not None else sys.stderr

    def make(label: str, total: int | None = None, unit: Unit = "B") -> Meter:
        if target.isatty():
            return BarMeter(label, total, unit, stream=target)
        return PlainMeter(label, total, unit, stream=target, interval=interval)

    return make
