"""cache.*: keep images across fresh CI machines."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.build import images_to_cache
from layerkeep.cache import load_images, save_images
from layerkeep.cache_store import CacheDir
from layerkeep.taskkit import engine_for, reported, say, settings

_HELP = {"cache_dir": "cache folder (default: LAYERKEEP_CACHE_DIR)"}


@task(help=_HELP)
@reported
def load(c: Context, cache_dir: str | None = None) -> None:
    """Restore cached images the engine lacks (damaged entries are skipped)."""
    current = settings(c, cache_dir=cache_dir)
    load_images(engine_for(current), CacheDir(current.cache_dir), log=say)


@task(help=_HELP)
@reported
def save(c: Context, cache_dir: str | None = None) -> None:
    """Save the app image, its stages and LAYERKEEP_CACHE_IMAGES into the cache."""
    current = settings(c, cache_dir=cache_dir)
    images = images_to_cache(current)
    engine = engine_for(current)
    save_images(engine, CacheDir(current.cache_dir), images, level=current.cache_level, log=say)
