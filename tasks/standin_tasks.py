"""standins.*: make official-image stand-ins on machines that cannot pull."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.standins.images import STANDINS, ensure_standins

from .taskkit import engine_for, reported, say, settings


@task(
    help={
        "only": "comma-separated stand-ins to make (default: all of " + ", ".join(STANDINS) + ")",
        "force": "rebuild even when the image is already present",
    }
)
@reported
def build(c: Context, only: str = "", force: bool = False) -> None:
    """Build debian, python, postgres, redis and registry images from Debian packages."""
    names = [name.strip() for name in only.split(",") if name.strip()] or None
    built = ensure_standins(engine_for(settings(c)), names=names, force=force, log=say)
    say(f"{len(built)} stand-in image(s) built")
