"""cache.*: keep images across fresh CI machines (a folder, or a registry)."""

from invoke.context import Context
from invoke.tasks import task

from layerkeep.cache.backend import load_cache, save_cache

from .taskkit import engine_for, reported, say, settings

_HELP = {
    "cache_dir": "cache folder (default: LAYERKEEP_CACHE_DIR)",
    "backend": "dir or registry (default: LAYERKEEP_CACHE_BACKEND)",
}


@task(help=_HELP)
@reported
def load(c: Context, cache_dir: str | None = None, backend: str | None = None) -> None:
    """Restore cached images the engine lacks (damaged entries are skipped)."""
    current = settings(c, cache_dir=cache_dir, cache_backend=backend)
    load_cache(engine_for(current), current, log=say)


@task(help=_HELP)
@reported
def save(c: Context, cache_dir: str | None = None, backend: str | None = None) -> None:
    """Save the app image, its stages and LAYERKEEP_CACHE_IMAGES into the cache."""
    current = settings(c, cache_dir=cache_dir, cache_backend=backend)
    save_cache(engine_for(current), current, log=say)
