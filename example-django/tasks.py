"""layerkeep's tasks for this project: `inv ci` runs the whole job, `inv --list` shows more.

It lives at the repository root, above the Django packages: a Celery app's own
``tasks.py`` inside an app package never shadows it.
"""

from layerkeep.tasks import ns

__all__ = ["ns"]
