"""layerkeep: Docker-based CI with a layer cache that survives fresh machines."""

__version__ = "0.1.0"
