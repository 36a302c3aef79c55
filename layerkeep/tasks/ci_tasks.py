"""ci: the whole job, declared as pre tasks; services.down always runs; a summary ends it.

The order comes from the graph: git.touch, cache.load, image.build, cache.save,
services.up, db.init, test.run, services.down (test.run's post), release.push.
"""

from typing import NoReturn

from invoke.context import Context

from .cache_load_tasks import load
from .cache_save_tasks import save
from .db_tasks import init
from .git_tasks import touch
from .graph import Note, step
from .image_tasks import build
from .release_tasks import push
from .services_tasks import up
from .testrun_tasks import run


@step("ci", pre=[touch, load, build, save, up, init, run, push], role="group")
def ci(c: Context) -> Note:
    """The whole CI job: every task, in the graph's order; cleanup always runs.

    In order: git.touch, cache.load, image.build, cache.save, services.up, db.init,
    test.run, services.down, release.push. A summary ends it. `inv --dry ci` prints the
    plan and what each task would do, and changes nothing.
    """
    return None


def add_step(*_: object, **__: object) -> NoReturn:
    """Gone: steps are added with ``layerkeep.tasks.collection(steps=...)``."""
    raise SystemExit(
        "layerkeep: ci_tasks.add_step() was replaced: in tasks.py write "
        "`ns = collection(steps=[lint])` (after test.run) or "
        '`collection(steps=[(lint, "image.build")])`, with '
        "`from layerkeep.tasks import collection`"
    )
