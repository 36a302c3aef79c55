"""The one type every step's messages go through: a function taking one line."""

from collections.abc import Callable

# Where a function says what it did: ``print`` by default, a task's masked log in a run.
Log = Callable[[str], None]
