"""layerkeep's Invoke collection: `inv --list` shows it; other projects import it.

In another project's tasks.py::

    from invoke import Collection
    from layerkeep.tasks import ns as layerkeep_ns
    ns = Collection.from_module(my_tasks)  # your own tasks
    for name, collection in layerkeep_ns.collections.items():
        ns.add_collection(collection, name)
"""

from typing import Any, cast

from invoke.collection import Collection
from invoke.tasks import Task

from . import (
    cache_tasks,
    ci_tasks,
    db_tasks,
    git_tasks,
    image_tasks,
    release_tasks,
    services_tasks,
    standin_tasks,
    testing_tasks,
)

ns = Collection()
ns.add_collection(Collection.from_module(git_tasks), "git")
ns.add_collection(Collection.from_module(cache_tasks), "cache")
ns.add_collection(Collection.from_module(image_tasks), "image")
ns.add_collection(Collection.from_module(services_tasks), "services")
ns.add_collection(Collection.from_module(db_tasks), "db")
ns.add_collection(Collection.from_module(testing_tasks), "test")
ns.add_collection(Collection.from_module(release_tasks), "release")
ns.add_collection(Collection.from_module(standin_tasks), "standins")
ns.add_task(cast(Task[Any], ci_tasks.ci))  # invoke types @task's result loosely
