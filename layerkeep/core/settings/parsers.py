"""Setting parsers: a setting's text (and the project folder) -> its typed value.

Each takes the text as written and the project folder (relative paths are taken from
it), and returns the value its Settings field holds or raises Invalid, whose text says
what is allowed. The value types only settings hold (Mount, BuildSecret, the builder and
cache choices) live here beside their parsers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from layerkeep.core import ci_vars
from layerkeep.core.imageref import ImageRef, parse_image_ref
from layerkeep.core.service_specs import parse_names
from layerkeep.core.values import (
    Invalid,
    parse_bool,
    parse_list,
    parse_pairs,
    parse_size,
    parse_whole_number,
)

Builder = Literal["auto", "legacy", "buildkit"]
BUILDERS: tuple[Builder, ...] = ("auto", "legacy", "buildkit")
CacheBackend = Literal["dir", "registry"]
CACHE_BACKENDS: tuple[CacheBackend, ...] = ("dir", "registry")
ReadOnly = Literal["auto", "yes", "no"]
READ_ONLY: tuple[ReadOnly, ...] = ("auto", "yes", "no")
Compression = Literal["zstd", "gzip"]
COMPRESSIONS: tuple[Compression, ...] = ("zstd", "gzip")
Choice = TypeVar("Choice", bound=str)


@dataclass(frozen=True)
class Mount:
    """A host file or folder mounted into the test container."""

    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class BuildSecret:
    """A BuildKit secret: ``RUN --mount=type=secret,id=<id>`` reads the variable's value."""

    id: str
    variable: str

    def __str__(self) -> str:
        return self.variable if self.id == self.variable else f"{self.id}={self.variable}"


# --- text, paths, lists ----------------------------------------------------------------


def text(value: str, _: Path) -> str:
    return value.strip()


def folder(value: str, project_dir: Path) -> Path:
    # An absolute value replaces project_dir: that is how "/ci/cache" works.
    return project_dir / (value.strip() or ".")


def optional_folder(value: str, project_dir: Path) -> Path | None:
    return project_dir / value.strip() if value.strip() else None


def path(value: str, _: Path) -> Path:
    return Path(value.strip())


def files(value: str, project_dir: Path) -> tuple[Path, ...]:
    return tuple(project_dir / item for item in parse_list(value))


def items(value: str, _: Path) -> tuple[str, ...]:
    return parse_list(value)


def pairs(value: str, _: Path) -> dict[str, str]:
    return parse_pairs(value)


def service_names(value: str, _: Path) -> tuple[str, ...]:
    return parse_names(value)


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def variable_names(value: str, _: Path) -> tuple[str, ...]:
    names = parse_list(value)
    for name in names:
        if not _VARIABLE.fullmatch(name):
            raise Invalid(f"{name!r}: write variable names (letters, digits, _), comma-separated")
    return names


def mounts(value: str, project_dir: Path) -> tuple[Mount, ...]:
    found: list[Mount] = []
    for item in parse_list(value):
        parts = item.split(":")
        mode = parts.pop() if len(parts) == 3 else "rw"
        if len(parts) != 2 or not parts[1].startswith("/") or mode not in ("ro", "rw"):
            raise Invalid(f"{item!r}: write host-path:/container/path[:ro], comma-separated")
        found.append(Mount(project_dir / parts[0], parts[1], read_only=mode == "ro"))
    return tuple(found)


# --- choices and numbers ---------------------------------------------------------------


def one_of(choices: tuple[Choice, ...]) -> Callable[[str, Path], Choice]:
    """A parser taking one of ``choices`` (``auto``, ``legacy``, ...) and nothing else."""

    def parse(value: str, _: Path) -> Choice:
        for choice in choices:
            if value.strip() == choice:
                return choice
        raise Invalid(f"allowed: {', '.join(choices)}")

    return parse


def yes_no(value: str, _: Path) -> bool:
    return parse_bool(value)


def yes_no_or_unset(value: str, _: Path) -> bool:
    # Empty is "not set": the loader then takes the CI's answer.
    return parse_bool(value) if value.strip() else False


def node_number(value: str, _: Path) -> int:
    """A node number or count (1 to 1000); empty is "not set": the loader then takes the
    CI's answer."""
    return parse_whole_number(value, 1, 1000) if value.strip() else 1


def whole_number(low: int, high: int) -> Callable[[str, Path], int]:
    """A parser taking a whole number from ``low`` to ``high``."""

    def parse(value: str, _: Path) -> int:
        return parse_whole_number(value, low, high)

    return parse


def size(value: str, _: Path) -> int:
    return parse_size(value)


# --- images, registries, the job -------------------------------------------------------


def image(value: str, _: Path) -> ImageRef | None:
    if not value.strip():
        return None
    found = parse_image_ref(value.strip())
    if found is None:
        raise Invalid("use a Docker reference like myorg/app or app:dev (lowercase)")
    return found


def images(value: str, _: Path) -> tuple[str, ...]:
    listed = parse_list(value)
    for name in listed:
        if parse_image_ref(name) is None:
            raise Invalid(f"{name!r} is not an image reference; separate images with commas")
    return listed


_REGISTRY = re.compile(r"[a-zA-Z0-9.-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?")


def registry(value: str, _: Path) -> str:
    host = value.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    if host and not _REGISTRY.fullmatch(host):
        raise Invalid("write a registry host with an optional port, e.g. ghcr.io or 127.0.0.1:5000")
    return host


def build_id(value: str, _: Path) -> str:
    return ci_vars.safe_build_id(value.strip())


# --- build args and secrets ------------------------------------------------------------

# Build args travel to the docker CLI in its environment (so that their values never
# show on a command line): a name the CLI, its plugins or its loader read themselves
# would change what it does (where it connects, which login config it uses, which
# programs it runs). Proxies are Docker's own predefined build args, and stay allowed.
_CLI_VARIABLES = frozenset(
    {"PATH", "HOME", "TMPDIR", "GODEBUG", "SSL_CERT_FILE", "SSL_CERT_DIR", "XDG_CONFIG_HOME"}
)
_CLI_PREFIXES = ("DOCKER_", "BUILDX_", "BUILDKIT_", "LD_")
# BuildKit's own build args: read by the Dockerfile frontend, not by the CLI.
_FRONTEND_ARGS = frozenset(
    {
        "BUILDKIT_SYNTAX", "BUILDKIT_INLINE_CACHE", "BUILDKIT_CONTEXT_KEEP_GIT_DIR",
        "BUILDKIT_CACHE_MOUNT_NS", "BUILDKIT_MULTI_PLATFORM", "BUILDKIT_SANDBOX_HOSTNAME",
    }
)


def cli_variable_among(names: Collection[str]) -> str:
    """Why the first of these build-arg names cannot be one ("" when all can)."""
    for name in names:
        if name in _FRONTEND_ARGS:
            continue
        if name in _CLI_VARIABLES or name.startswith(_CLI_PREFIXES):
            return (
                f"build arg {name} would be set in the docker CLI's own environment, where "
                "build args travel, and change what the CLI does; give the ARG another name "
                "in the Dockerfile and here"
            )
    return ""


def build_args(value: str, _: Path) -> dict[str, str]:
    given = parse_pairs(value)
    problem = cli_variable_among(given)
    if problem:
        raise Invalid(problem)
    return given


_SECRET_ID = re.compile(r"[A-Za-z0-9_.-]+")


def build_secrets(value: str, _: Path) -> tuple[BuildSecret, ...]:
    found: list[BuildSecret] = []
    for item in parse_list(value):
        secret_id, equals, variable = item.partition("=")
        variable = variable if equals else secret_id
        if not _SECRET_ID.fullmatch(secret_id) or not _VARIABLE.fullmatch(variable):
            raise Invalid(f"{item!r}: write VARIABLE or id=VARIABLE, comma-separated")
        found.append(BuildSecret(secret_id, variable))
    return tuple(found)
