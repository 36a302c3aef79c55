"""What every task shares: the settings in the Invoke context, the engine, one error exit."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

import docker.errors
import requests.exceptions
from invoke.context import Context
from invoke.exceptions import Exit

from layerkeep.core.engine import BUILD_ID_LABEL, PROJECT_LABEL, Engine, connect
from layerkeep.core.errors import LayerkeepError
from layerkeep.core.settings import Settings, load_settings

_SETTINGS_KEY = "layerkeep_settings"
P = ParamSpec("P")
R = TypeVar("R")


def project_dir(c: Context) -> Path:
    """The folder of the tasks file `inv` found (the project), else the current folder."""
    prefix = getattr(c.config, "_project_prefix", None)
    return Path(prefix) if prefix else Path.cwd()


def environ() -> Mapping[str, str]:
    """The process environment: the one place the task layer reads it."""
    return dict(os.environ)


def settings(c: Context, **flags: str | None) -> Settings:
    """The settings, loaded on first use and kept in the shared context; flags on top."""
    loaded = c.config.get(_SETTINGS_KEY)
    if not isinstance(loaded, Settings):
        loaded = load_settings(project_dir(c), environ())
        c.config[_SETTINGS_KEY] = cast(Any, loaded)  # invoke types config values as str
    return loaded.with_flags(**flags)


def engine_for(settings: Settings) -> Engine:
    """A connected engine whose labels mark this project and build."""
    labels = {PROJECT_LABEL: settings.project, BUILD_ID_LABEL: settings.build_id}
    return connect(environ(), labels=labels, timeout=settings.docker_timeout)


def say(message: str) -> None:
    """One line of task output."""
    print(message, flush=True)


def reported(body: Callable[P, R]) -> Callable[P, R]:
    """Turn a LayerkeepError into one line on stderr and its exit code: the one place."""

    @functools.wraps(body)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return body(*args, **kwargs)
        except LayerkeepError as error:
            sys.stdout.flush()
            raise Exit(f"layerkeep: {error.one_line()}", code=error.exit_code) from None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as error:
            # The last resort for an engine failure no step turned into its own error.
            sys.stdout.flush()
            text = " ".join(str(error).split()) or type(error).__name__
            raise Exit(f"layerkeep: the Docker engine failed: {text}", code=1) from None

    return run


