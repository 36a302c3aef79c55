"""settings: every resolved setting, its value (secrets masked) and where it came from."""

from invoke.context import Context

from layerkeep.core.settings import describe_settings

from .graph import Note, settings, step
from .taskkit import say


@step("settings", help={"all_keys": "also list settings left at their defaults"}, uses_job=False)
def show(c: Context, all_keys: bool = False) -> Note:
    """Print each setting, its value and its origin (default, file:line, environment)."""
    # Read-only (uses_job=False): alone, it locks no build id. Beside other tasks it
    # shows what they run with, flags of the command included.
    current = settings(c)
    read = ", ".join(str(path) for path in current.env_files) or "none"
    say(f"env files read: {read}")
    rows = [row for row in describe_settings(current) if all_keys or row.origin != "default"]
    width = max((len(row.name) for row in rows), default=0)
    for row in rows:
        say(f"{row.name:<{width}}  {row.value}  ({row.origin})")
        if all_keys:
            say(f"{'':<{width}}    {row.doc}")
    if not all_keys:
        say("(settings at their defaults are left out: --all-keys lists them with their doc)")
    return f"{len(rows)} settings"
