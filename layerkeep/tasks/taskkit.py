"""What every task reads: the project folder, the environment, the settings, the engine."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from invoke.config import Config

from layerkeep.core.engine import Engine
from layerkeep.core.engine_start import connect_or_start
from layerkeep.core.job import Job
from layerkeep.core.log import Log
from layerkeep.core.progress import MeterFactory, for_stream
from layerkeep.core.settings import Settings, load_settings


def project_dir(config: Config) -> Path:
    """The folder of the tasks file `inv` found (the project), else the current folder."""
    prefix = getattr(config, "_project_prefix", None)
    return Path(prefix) if prefix else Path.cwd()


def environ() -> Mapping[str, str]:
    """The process environment: the one place the task layer reads it."""
    return dict(os.environ)


def load_project_settings(config: Config) -> Settings:
    """The project's settings from its env files and the process environment."""
    return load_settings(project_dir(config), environ())


def engine_for(settings: Settings) -> Engine:
    """A connected engine working for the job the settings describe (its labels, names).

    On a fresh machine whose local engine is down, it is started when we may (root,
    dockerd installed), with one line saying so.
    """
    return connect_or_start(
        environ(), job=Job.from_settings(settings), timeout=settings.docker_timeout, log=say
    )


def say(message: str) -> None:
    """One line of task output."""
    print(message, flush=True)


def meters() -> MeterFactory:
    """Progress of long transfers: a bar on a terminal, a line every few seconds in logs."""
    return for_stream(sys.stdout)


def masked_log(settings: Settings) -> Log:
    """Task output with every secret of the job masked: what library functions log.

    Builders echo commands with build arguments filled in, tests print what they like:
    whatever a library function passes on is masked here, once, for all of them.
    """
    mask = Job.from_settings(settings).mask
    return lambda line: say(mask(line))
