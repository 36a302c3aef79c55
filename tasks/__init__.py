"""layerkeep's Invoke collection: `inv --list` shows it; other projects import it.

In another project's tasks.py::

    from invoke import Collection
    from layerkeep.tasks import ns as layerkeep_ns
    ns = Collection.from_module(my_tasks)  # your own tasks
    for name, collection in layerkeep_ns.collections.items():
        ns.add_collection(collection, name)
"""

from invoke.collection import Collection

from . import cache_tasks, git_tasks, image_tasks, standin_tasks

ns = Collection()
ns.add_collection(Collection.from_module(git_tasks), "git")
ns.add_collection(Collection.from_module(cache_tasks), "cache")
ns.add_collection(Collection.from_module(image_tasks), "image")
ns.add_collection(Collection.from_module(standin_tasks), "standins")
