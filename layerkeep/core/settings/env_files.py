"""Env files: which to read, and reading them without touching ``os.environ``.

``layerkeep.env`` < ``.env`` < ``.env.local`` (later files winning), or the list in
``LAYERKEEP_ENV_FILES``. ``${NAME}`` inside an env file takes NAME from the process
environment first, then from the files' own earlier values.
"""

from __future__ import annotations

import io
from collections import ChainMap
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from dotenv.parser import parse_stream
from dotenv.variables import parse_variables

from layerkeep.core.errors import ConfigError
from layerkeep.core.values import parse_list

# Read in this order, later files winning; layerkeep.env holds a project's committed
# settings when its .env is the application's own (private, git-ignored).
ENV_FILES = ("layerkeep.env", ".env", ".env.local")
ENV_FILES_KEY = "LAYERKEEP_ENV_FILES"


class EnvFiles(NamedTuple):
    """What the env files set: key -> (value, "file:line"), and the files that were read."""

    values: dict[str, tuple[str, str]]
    read: tuple[Path, ...]


def env_file_paths(project_dir: Path, environ: Mapping[str, str]) -> tuple[Path, ...]:
    """The env files to read, lowest precedence first: ``LAYERKEEP_ENV_FILES`` or the default.

    ``LAYERKEEP_ENV_FILES`` is read from the process environment only (an env file cannot
    name the env files); its comma-separated paths are relative to the project or absolute,
    and an empty value reads none.
    """
    listed = environ.get(ENV_FILES_KEY)
    names = ENV_FILES if listed is None else parse_list(listed)
    return tuple(project_dir / name for name in names)


def read_env_files(project_dir: Path, environ: Mapping[str, str]) -> EnvFiles:
    """Every key the existing env files set, a later file's value winning; missing files skip."""
    values: dict[str, tuple[str, str]] = {}
    read: list[Path] = []
    for path in env_file_paths(project_dir, environ):
        if not path.exists():
            continue
        defined = {key: value for key, (value, _) in values.items()}
        for key, (value, where) in read_env_file(path, environ, defined).items():
            if key == ENV_FILES_KEY:
                raise ConfigError(
                    f"{key} is read from the process environment only (found at {where})",
                    key=key,
                    hint="set it in the environment, e.g. in your CI's configuration",
                )
            values[key] = (value, where)
        read.append(path)
    return EnvFiles(values, tuple(read))


def read_env_file(
    path: Path, environ: Mapping[str, str], defined: Mapping[str, str] | None = None
) -> dict[str, tuple[str, str]]:
    """Parse one env file into key -> (value, "file:line"); a malformed line is an error.

    ``${NAME}`` and ``${NAME:-default}`` expand, except inside single quotes, from
    ``environ`` first, then from earlier lines and ``defined`` (earlier files' values):
    the process environment outranks env files here as everywhere.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(
            f"cannot read it: {error.strerror or error}",
            source=str(path),
            hint="make it a readable file, or remove it",
        ) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"line {line} is not UTF-8 text (byte {data[error.start]:#04x})",
            source=f"{path}:{line}",
            hint="save the file as UTF-8",
        ) from None
    result: dict[str, tuple[str, str]] = {}
    earlier: dict[str, str] = {}
    known = ChainMap(dict(environ), earlier, dict(defined or {}))
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            # Only what precedes "=": the value may be a secret.
            shown = binding.original.string.strip().split("=", 1)
            shown_text = f"{shown[0][:60]}=..." if len(shown) > 1 else shown[0][:60]
            raise ConfigError(
                f"line {line} is not KEY=VALUE: {shown_text!r}",
                source=str(path),
                hint="write KEY=value, quote values with spaces, start comments with #",
            )
        if binding.key is None:
            continue
        value = binding.value or ""
        if not binding.original.string.split("=", 1)[-1].lstrip().startswith("'"):
            value = "".join(atom.resolve(known) for atom in parse_variables(value))
        earlier[binding.key] = value
        result[binding.key] = (value, f"{path}:{line}")
    return result
