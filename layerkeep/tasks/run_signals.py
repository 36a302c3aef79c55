"""SIGINT and SIGTERM during a run: they interrupt its work, and wait for its cleanup."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from .failures import Interrupted
from .taskkit import say

_SIGNAL_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class RunSignals:
    """The handlers a run sets, and those it puts back when it ends."""

    def __init__(self) -> None:
        self._old_handlers: dict[int, Any] = {}

    def arm(self) -> None:
        """SIGTERM (what CI sends on cancel) interrupts the run like SIGINT does."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNAL_CODES:
            self._old_handlers[signum] = signal.signal(signum, _interrupt)

    def hold(self, what: str) -> None:
        """A signal is noted, not acted on, while ``what`` must finish."""
        if not self._old_handlers:
            return

        def note(signum: int, _: FrameType | None) -> None:
            say(f"{signal.Signals(signum).name} received: finishing {what} first")

        for signum in _SIGNAL_CODES:
            signal.signal(signum, note)

    def restore(self) -> None:
        """The handlers from before :meth:`arm`."""
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}


def _interrupt(signum: int, _: FrameType | None) -> None:
    raise Interrupted(signum)
