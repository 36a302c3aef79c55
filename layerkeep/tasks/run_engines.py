"""A run's engine connections and builders: each made once per job, closed at the end."""

from __future__ import annotations

from layerkeep.building.builder import Builder, choose_builder
from layerkeep.core.engine import Engine
from layerkeep.core.settings import Settings

from .taskkit import engine_for, environ


class RunEngines:
    """What a run's tasks share to reach the engine of the job their settings describe."""

    def __init__(self) -> None:
        self._engines: dict[tuple[str, str], Engine] = {}
        self._builders: dict[tuple[str, str, str, str], Builder] = {}

    def engine(self, settings: Settings) -> Engine:
        """One connection per job for the whole run, closed when the run ends."""
        key = (settings.project, settings.build_id)
        if key not in self._engines:
            self._engines[key] = engine_for(settings)
        return self._engines[key]

    def builder(self, settings: Settings) -> Builder:
        """The builder the settings resolve to, found once per run (probing the docker
        CLIs takes a few subprocesses) and shared by cache.load, image.build and
        cache.save."""
        key = (settings.project, settings.build_id, settings.builder, settings.docker_cli)
        if key not in self._builders:
            self._builders[key] = choose_builder(
                settings.builder, environ(), cli=settings.docker_cli, engine=self.engine(settings)
            )
        return self._builders[key]

    def close(self) -> None:
        """Close every connection; the next task would connect again."""
        for connected in self._engines.values():
            connected.close()
        self._engines = {}
        self._builders = {}
