"""One settings object, loaded once, from defaults, env files, the environment and flags.

Precedence, lowest first (the order of :class:`Source`): built-in defaults < ``.env`` <
``.env.local`` < the process environment < task flags. Env files are read without
touching ``os.environ``; every loader takes the environment mapping as a parameter.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, cast

from dotenv.parser import parse_stream
from dotenv.variables import parse_variables

from layerkeep import ci_vars
from layerkeep.errors import ConfigError
from layerkeep.imageref import ImageRef, parse_image_ref

PREFIX = "LAYERKEEP_"
ENV_FILES = (".env", ".env.local")
Builder = Literal["auto", "legacy", "buildkit"]
BUILDERS: tuple[Builder, ...] = ("auto", "legacy", "buildkit")


class Source(IntEnum):
    """Where a value came from; a higher source overrides a lower one."""

    DEFAULT = 0
    ENV_FILE = 1
    ENV_LOCAL_FILE = 2
    ENVIRONMENT = 3
    FLAG = 4


class Invalid(ValueError):
    """A value a parser rejects; its text says what is allowed."""


def _text(value: str, _: Path) -> str:
    return value.strip()


def _image(value: str, _: Path) -> ImageRef | None:
    if not value.strip():
        return None
    image = parse_image_ref(value.strip())
    if image is None:
        raise Invalid("use a Docker reference like myorg/app or app:dev (lowercase)")
    return image


def _folder(value: str, project_dir: Path) -> Path:
    return project_dir / (value.strip() or ".")


def _path(value: str, _: Path) -> Path:
    return Path(value.strip())


def _build_args(value: str, _: Path) -> dict[str, str]:
    pairs = [part.strip() for part in value.split(",") if part.strip()]
    if not all(_BUILD_ARG.match(pair) for pair in pairs):
        raise Invalid("write comma-separated NAME=value pairs")
    return dict(pair.split("=", 1) for pair in pairs)


def _builder(value: str, _: Path) -> Builder:
    if value.strip() not in BUILDERS:
        raise Invalid(f"allowed: {', '.join(BUILDERS)}")
    return cast(Builder, value.strip())


def _images(value: str, _: Path) -> tuple[str, ...]:
    images = tuple(part.strip() for part in value.split(",") if part.strip())
    for image in images:
        if parse_image_ref(image) is None:
            raise Invalid(f"{image!r} is not an image reference; separate images with commas")
    return images


def _whole_number(low: int, high: int) -> Callable[[str, Path], int]:
    def parse(value: str, _: Path) -> int:
        try:
            number = int(value.strip())
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise Invalid(f"use a whole number from {low} to {high}")
        return number

    return parse


_BUILD_ARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Key:
    """A documented setting: its name, default, meaning, and how its text is read."""

    name: str
    default: str
    doc: str
    parse: Callable[[str, Path], object] = _text

    @property
    def field(self) -> str:
        """The Settings attribute this key fills."""
        return self.name.removeprefix(PREFIX).lower()


KEYS: tuple[Key, ...] = (
    Key("LAYERKEEP_PROJECT", "", "Project name used in labels; default: the folder's name."),
    Key("LAYERKEEP_IMAGE", "", "Repository (and optional tag) of the app image.", _image),
    Key("LAYERKEEP_CONTEXT", ".", "Build context folder, relative to the project.", _folder),
    Key("LAYERKEEP_DOCKERFILE", "Dockerfile", "Dockerfile, relative to the context.", _path),
    Key("LAYERKEEP_BUILD_ARGS", "", "Build arguments: comma-separated NAME=value.", _build_args),
    Key("LAYERKEEP_BUILDER", "auto", "auto (BuildKit if it works), legacy or buildkit.", _builder),
    Key("LAYERKEEP_DOCKER_CLI", "", "docker CLI for BuildKit builds; default: one that works."),
    Key("LAYERKEEP_DOCKER_TIMEOUT", "120", "Seconds per Docker API call.", _whole_number(1, 3600)),
    Key("LAYERKEEP_CACHE_DIR", ".layerkeep-cache", "Folder holding the layer cache.", _folder),
    Key("LAYERKEEP_CACHE_IMAGES", "", "More images to cache, comma-separated.", _images),
    Key("LAYERKEEP_CACHE_LEVEL", "3", "zstd level of cached layers.", _whole_number(1, 19)),
    Key("LAYERKEEP_BUILD_ID", "", "Id of this CI job; default: the CI's own, else 'local'."),
    Key("LAYERKEEP_COMMIT", "", "Commit SHA; default: the CI's own variable, else git."),
    Key("LAYERKEEP_BRANCH", "", "Branch name; default: the CI's own variable, else git."),
)
KNOWN = {key.name: key for key in KEYS}


@dataclass(frozen=True)
class Settings:
    """Everything the tasks need, resolved and validated."""

    project_dir: Path
    project: str
    image: ImageRef | None
    context: Path
    dockerfile: Path
    build_args: Mapping[str, str]
    builder: Builder
    docker_cli: str
    docker_timeout: int
    cache_dir: Path
    cache_images: tuple[str, ...]
    cache_level: int
    build_id: str
    commit: str
    branch: str
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def require_image(self) -> ImageRef:
        """The app image, or a one-line error saying how to set it."""
        if self.image is None:
            raise ConfigError(
                "LAYERKEEP_IMAGE is not set",
                key="LAYERKEEP_IMAGE",
                hint="set it in .env, e.g. LAYERKEEP_IMAGE=myorg/app, or pass --image",
            )
        return self.image

    def with_flags(self, **flags: str | None) -> Settings:
        """A copy with task flags applied (None means "not given"); keys are lowercase names."""
        raw = {f"{PREFIX}{name.upper()}": value for name, value in flags.items() if value}
        if not raw:
            return self
        values = {name: (value, f"flag --{name[len(PREFIX):].lower().replace('_', '-')}")
                  for name, value in raw.items()}
        parsed = _parse_fields(values, self.project_dir)
        return replace(self, **parsed)


def load_settings(
    project_dir: Path,
    environ: Mapping[str, str],
    *,
    git_facts: Callable[[Path], ci_vars.GitFacts] = ci_vars.git_facts,
) -> Settings:
    """Read defaults, env files and ``environ`` (in that order) into validated settings."""
    values: dict[str, tuple[str, str]] = {k.name: (k.default, "default") for k in KEYS}
    file_values: dict[str, str] = {}
    for file_name in ENV_FILES:
        path = project_dir / file_name
        if path.is_file():
            for key, (value, where) in read_env_file(path, {**environ, **file_values}).items():
                file_values[key] = value
                if key.startswith(PREFIX):
                    values[key] = (value, where)
    for key, value in environ.items():
        if key.startswith(PREFIX):
            values[key] = (value, "environment")
    _reject_unknown(values)
    parsed = _parse_fields(values, project_dir)
    project = parsed.pop("project") or project_dir.resolve().name
    ci = ci_vars.detect(environ)
    commit = parsed.pop("commit") or ci.commit
    branch = parsed.pop("branch") or ci.branch
    if not (commit and branch):
        facts = git_facts(project_dir)
        commit, branch = commit or facts.commit, branch or facts.branch
    return Settings(
        project_dir=project_dir,
        project=project,
        build_id=parsed.pop("build_id") or ci.build_id or "local",
        commit=commit,
        branch=branch,
        origins={key: where for key, (_, where) in values.items()},
        **parsed,
    )


def read_env_file(path: Path, environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """Parse one env file into key -> (value, "file:line"); a malformed line is an error.

    ``${NAME}`` and ``${NAME:-default}`` expand from earlier lines and ``environ``,
    except inside single quotes, as python-dotenv does.
    """
    result: dict[str, tuple[str, str]] = {}
    known: dict[str, str] = dict(environ)
    with path.open(encoding="utf-8") as stream:
        for binding in parse_stream(stream):
            line = binding.original.line
            if binding.error:
                text = binding.original.string.strip()
                raise ConfigError(
                    f"line {line} is not KEY=VALUE: {text[:60]!r}",
                    source=str(path),
                    hint="write KEY=value, quote values with spaces, start comments with #",
                )
            if binding.key is None:
                continue
            value = binding.value or ""
            if not binding.original.string.split("=", 1)[-1].lstrip().startswith("'"):
                value = "".join(atom.resolve(known) or "" for atom in parse_variables(value))
            known[binding.key] = value
            result[binding.key] = (value, f"{path}:{line}")
    return result


def _reject_unknown(values: Mapping[str, tuple[str, str]]) -> None:
    for key, (_, where) in values.items():
        if key not in KNOWN:
            close = difflib.get_close_matches(key, KNOWN, n=1)
            hint = f"did you mean {close[0]}?" if close else "see .env.example for every key"
            raise ConfigError(f"unknown setting {key} (from {where})", key=key, hint=hint)


def _parse_fields(values: Mapping[str, tuple[str, str]], project_dir: Path) -> dict[str, Any]:
    """Turn raw strings into typed fields; each error names the key and where it came from."""
    parsed: dict[str, Any] = {}
    for name, (value, where) in values.items():
        key = KNOWN[name]
        try:
            parsed[key.field] = key.parse(value, project_dir)
        except Invalid as error:
            raise ConfigError(
                f"{name}={value!r} (from {where}) is not valid", key=name, hint=str(error)
            ) from None
    return parsed
