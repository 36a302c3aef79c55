"""Invoke's entry in this repository: layerkeep's task collection (layerkeep/tasks),
configured by layerkeep.env for the bundled example (`inv --list`, `inv ci`)."""

from layerkeep.tasks import ns

__all__ = ["ns"]
