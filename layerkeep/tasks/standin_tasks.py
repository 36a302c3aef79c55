"""standins.*: make official-image stand-ins on machines that cannot pull."""

from invoke.context import Context

from layerkeep.standins.images import STANDINS, ensure_standins

from .graph import Note, engine, is_dry, say_plan, settings, step
from .taskkit import say


@step(
    "standins.build",
    help={
        "only": "comma-separated stand-ins to make (default: all of " + ", ".join(STANDINS) + ")",
        "force": "rebuild even when the image is already present",
    },
)
def build(c: Context, only: str = "", force: bool = False) -> Note:
    """Build debian, python, postgres, redis and registry images from Debian packages."""
    names = [name.strip() for name in only.split(",") if name.strip()] or None
    if is_dry(c):
        return say_plan([f"would build the stand-ins {', '.join(names or STANDINS)} when absent"])
    built = ensure_standins(engine(c, settings(c)), names=names, force=force, log=say)
    say(f"{len(built)} stand-in image(s) built")
    return f"{len(built)} built"
