"""Something that holds connections: close it, or use it as a context manager."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Self


class Closing(ABC):
    """Closed by :meth:`close`, or on leaving a ``with`` block."""

    @abstractmethod
    def close(self) -> None:
        """Release the connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
