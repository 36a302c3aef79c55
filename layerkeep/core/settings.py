"""One settings object, loaded once, from defaults, env files, the environment and flags.

Each setting is declared once, as a field of :class:`Settings` made with :func:`setting`
(its default text, meaning, parser and, for a few, the task flag that sets it for one
command); the key list, the loader, the ``.env.example`` check, :func:`describe_settings`
and the task flags (:data:`FLAGS`, with their help text) derive from those declarations.

Precedence, lowest first (the order of :class:`Source`): built-in defaults < env files
(``layerkeep.env`` < ``.env`` < ``.env.local``, or the list in ``LAYERKEEP_ENV_FILES``)
< the process environment < task flags. ``${NAME}`` inside an env file follows the same
order: the process environment first, then the files' own earlier values. Env files are
read without touching ``os.environ``; every loader takes the environment as a parameter.
"""

from __future__ import annotations

import difflib
import io
import re
from collections import ChainMap
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import IntEnum
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, cast, get_type_hints

from dotenv.parser import parse_stream
from dotenv.variables import parse_variables

from layerkeep.core import ci_vars
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import ImageRef, parse_image_ref
from layerkeep.core.service_specs import (
    KNOWN_KINDS,
    SERVICE_KEYS,
    SUFFIXES,
    ServiceSpec,
    parse_names,
    parse_service,
    service_key,
)
from layerkeep.core.values import (
    Invalid,
    parse_bool,
    parse_list,
    parse_pairs,
    parse_size,
    parse_whole_number,
)

PREFIX = "LAYERKEEP_"
# Read in this order, later files winning; layerkeep.env holds a project's committed
# settings when its .env is the application's own (private, git-ignored).
ENV_FILES = ("layerkeep.env", ".env", ".env.local")
ENV_FILES_KEY = "LAYERKEEP_ENV_FILES"
# A variable whose name contains one of these is a secret, without being listed.
SECRET_MARKERS = ("PASSWORD", "SECRET", "TOKEN", "KEY")
MASK = "****"
Builder = Literal["auto", "legacy", "buildkit"]
BUILDERS: tuple[Builder, ...] = ("auto", "legacy", "buildkit")
CacheBackend = Literal["dir", "registry"]
CACHE_BACKENDS: tuple[CacheBackend, ...] = ("dir", "registry")
ReadOnly = Literal["auto", "yes", "no"]
READ_ONLY: tuple[ReadOnly, ...] = ("auto", "yes", "no")


class Source(IntEnum):
    """Where a value came from; a higher source overrides a lower one."""

    DEFAULT = 0
    ENV_FILE = 1
    ENVIRONMENT = 2
    FLAG = 3


class Raw(NamedTuple):
    """A setting's text as written, where it was written, and that place's precedence."""

    text: str
    where: str
    source: Source


# --- parsers: text (and the project folder) -> typed value, or Invalid ---------------


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
    # An absolute value replaces project_dir: that is how "/ci/cache" works.
    return project_dir / (value.strip() or ".")


def _path(value: str, _: Path) -> Path:
    return Path(value.strip())


def _pairs(value: str, _: Path) -> dict[str, str]:
    return parse_pairs(value)


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


@dataclass(frozen=True)
class BuildSecret:
    """A BuildKit secret: ``RUN --mount=type=secret,id=<id>`` reads the variable's value."""

    id: str
    variable: str

    def __str__(self) -> str:
        return self.variable if self.id == self.variable else f"{self.id}={self.variable}"


_SECRET_ID = re.compile(r"[A-Za-z0-9_.-]+")


def _build_secrets(value: str, _: Path) -> tuple[BuildSecret, ...]:
    secrets: list[BuildSecret] = []
    for item in parse_list(value):
        secret_id, equals, variable = item.partition("=")
        variable = variable if equals else secret_id
        if not _SECRET_ID.fullmatch(secret_id) or not _VARIABLE.fullmatch(variable):
            raise Invalid(f"{item!r}: write VARIABLE or id=VARIABLE, comma-separated")
        secrets.append(BuildSecret(secret_id, variable))
    return tuple(secrets)


def _build_args(value: str, _: Path) -> dict[str, str]:
    pairs = parse_pairs(value)
    problem = cli_variable_among(pairs)
    if problem:
        raise Invalid(problem)
    return pairs


def _flag(value: str, _: Path) -> bool:
    return parse_bool(value)


def _flag_or_empty(value: str, _: Path) -> bool:
    # Empty is "not set": the loader then takes the CI's answer.
    return parse_bool(value) if value.strip() else False


def _read_only(value: str, _: Path) -> ReadOnly:
    if value.strip() not in READ_ONLY:
        raise Invalid(f"allowed: {', '.join(READ_ONLY)}")
    return cast(ReadOnly, value.strip())


def _service_names(value: str, _: Path) -> tuple[str, ...]:
    return parse_names(value)


def _files(value: str, project_dir: Path) -> tuple[Path, ...]:
    return tuple(project_dir / item for item in parse_list(value))


def _list(value: str, _: Path) -> tuple[str, ...]:
    return parse_list(value)


_VARIABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _variable_names(value: str, _: Path) -> tuple[str, ...]:
    names = parse_list(value)
    for name in names:
        if not _VARIABLE.fullmatch(name):
            raise Invalid(f"{name!r}: write variable names (letters, digits, _), comma-separated")
    return names


_REGISTRY = re.compile(r"[a-zA-Z0-9.-]+(?::[0-9]+)?|\[[0-9a-fA-F:]+\](?::[0-9]+)?")


def _registry(value: str, _: Path) -> str:
    text = value.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    if text and not _REGISTRY.fullmatch(text):
        raise Invalid("write a registry host with an optional port, e.g. ghcr.io or 127.0.0.1:5000")
    return text


def _backend(value: str, _: Path) -> CacheBackend:
    if value.strip() not in CACHE_BACKENDS:
        raise Invalid(f"allowed: {', '.join(CACHE_BACKENDS)}")
    return cast(CacheBackend, value.strip())


def _optional_folder(value: str, project_dir: Path) -> Path | None:
    return project_dir / value.strip() if value.strip() else None


def _mounts(value: str, project_dir: Path) -> tuple[Mount, ...]:
    mounts: list[Mount] = []
    for item in parse_list(value):
        parts = item.split(":")
        mode = parts.pop() if len(parts) == 3 else "rw"
        if len(parts) != 2 or not parts[1].startswith("/") or mode not in ("ro", "rw"):
            raise Invalid(f"{item!r}: write host-path:/container/path[:ro], comma-separated")
        mounts.append(Mount(project_dir / parts[0], parts[1], read_only=mode == "ro"))
    return tuple(mounts)


def _builder(value: str, _: Path) -> Builder:
    if value.strip() not in BUILDERS:
        raise Invalid(f"allowed: {', '.join(BUILDERS)}")
    return cast(Builder, value.strip())


def _images(value: str, _: Path) -> tuple[str, ...]:
    images = parse_list(value)
    for image in images:
        if parse_image_ref(image) is None:
            raise Invalid(f"{image!r} is not an image reference; separate images with commas")
    return images


def _build_id(value: str, _: Path) -> str:
    return ci_vars.safe_build_id(value.strip())


def _size(value: str, _: Path) -> int:
    return parse_size(value)


def _whole_number(low: int, high: int) -> Callable[[str, Path], int]:
    def parse(value: str, _: Path) -> int:
        return parse_whole_number(value, low, high)

    return parse


# --- declarations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """A host file or folder mounted into the test container."""

    source: Path
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class Declaration:
    """A setting as declared on its Settings field (see :func:`setting`)."""

    default: str
    doc: str
    parse: Callable[[str, Path], object]
    secret: bool
    flag: str


def setting(
    default: str,
    doc: str,
    parse: Callable[[str, Path], object] = _text,
    *,
    secret: bool = False,
    flag: str = "",
) -> Declaration:
    """Declare a Settings field, ``x: Annotated[T, setting(...)]``, as ``LAYERKEEP_<X>``.

    ``default`` is the text used when nothing sets it, ``doc`` one line for listings,
    ``parse`` turns text into the field's value; a secret's value is never shown.
    ``flag`` (e.g. ``"--cache-dir"``) is the task flag that sets it for one command:
    tasks name the flags they take, and their help text comes from ``doc``.
    """
    return Declaration(default, doc, parse, secret, flag)


@dataclass(frozen=True)
class _Inputs:
    raw: Mapping[str, Raw]
    environ: Mapping[str, str]
    # Values that stand in for empty settings (from the CI, git, the folder's name),
    # found once at load time, with where they came from.
    fallbacks: Mapping[str, tuple[object, str]]
    env_files: tuple[Path, ...]


@dataclass(frozen=True)
class Settings:
    """Everything the tasks need, resolved and validated.

    Build it with :func:`load_settings`; flags go on top with :meth:`with_flags`.
    """

    project_dir: Path
    # Values never to print, longest first (see _secret_values).
    secret_values: tuple[str, ...] = field(repr=False)
    # The env files that existed and were read, lowest precedence first.
    env_files: tuple[Path, ...]
    # Where each LAYERKEEP_* value came from: default, file:line, environment, flag --x.
    origins: Mapping[str, str] = field(compare=False, repr=False)
    # What this was resolved from, so that flags resolve everything again on top.
    _inputs: _Inputs = field(compare=False, repr=False)
    project: Annotated[str, setting("", "Project name used in labels; default: the folder's name.")]
    image: Annotated[
        ImageRef | None,
        setting("", "Repository (and optional tag) of the app image.", _image, flag="--image"),
    ]
    context: Annotated[
        Path, setting(".", "Build context folder, relative to the project.", _folder)
    ]
    dockerfile: Annotated[
        Path, setting("Dockerfile", "Dockerfile, relative to the context.", _path)
    ]
    build_args: Annotated[
        Mapping[str, str],
        setting("", "Build arguments: comma-separated NAME=value.", _build_args),
    ]
    build_secrets: Annotated[
        tuple[BuildSecret, ...],
        setting(
            "", "BuildKit secrets: environment variables (VARIABLE or id=VARIABLE), "
            "comma-separated.", _build_secrets,
        ),
    ]
    builder: Annotated[
        Builder,
        setting(
            "auto", "auto (BuildKit if it works), legacy or buildkit.", _builder,
            flag="--builder",
        ),
    ]
    docker_cli: Annotated[
        str, setting("", "docker CLI for BuildKit builds; default: one that works.")
    ]
    docker_timeout: Annotated[
        int, setting("120", "Seconds per Docker API call.", _whole_number(1, 3600))
    ]
    cache_dir: Annotated[
        Path,
        setting(
            ".layerkeep-cache", "Folder holding the layer cache (relative or absolute).", _folder,
            flag="--cache-dir",
        ),
    ]
    cache_images: Annotated[
        tuple[str, ...], setting("", "More images to cache, comma-separated.", _images)
    ]
    cache_level: Annotated[int, setting("3", "zstd level of cached layers.", _whole_number(1, 19))]
    cache_threads: Annotated[
        int,
        setting(
            "0", "zstd threads compressing cached layers; 0: one per core, at most 4.",
            _whole_number(0, 64),
        ),
    ]
    build_id: Annotated[
        str,
        setting(
            "", "Id of this CI job; default: from the CI's variables, else 'local'.", _build_id
        ),
    ]
    commit: Annotated[str, setting("", "Commit SHA; default: the CI's own variable, else git.")]
    branch: Annotated[str, setting("", "Branch name; default: the CI's own variable, else git.")]
    pull_request: Annotated[
        bool,
        setting(
            "", "Whether this job builds a pull/merge request; default: the CI's variables.",
            _flag_or_empty,
        ),
    ]
    # Parsed to names here; the loader then builds each service from its own keys.
    services: Annotated[
        tuple[ServiceSpec, ...],
        setting("", "Service containers, e.g. postgres,redis.", _service_names),
    ]
    sweep_after: Annotated[
        int,
        setting(
            "3600", "services.sweep removes leftovers older than this (s).",
            _whole_number(0, 10**7), flag="--older-than",
        ),
    ]
    db_service: Annotated[str, setting("postgres", "The postgres service db.init prepares.")]
    db_name: Annotated[str, setting("app_test", "Database db.init creates if missing.")]
    db_user: Annotated[
        str, setting("postgres", "Database user (the postgres service's superuser).")
    ]
    db_password: Annotated[
        str, setting("layerkeep", "Its password; never printed.", secret=True)
    ] = field(repr=False)
    db_init_sql: Annotated[
        tuple[Path, ...], setting("", "SQL files db.init runs, comma-separated.", _files)
    ]
    db_init_command: Annotated[str, setting("", "Command db.init runs in the app image.")]
    test_command: Annotated[
        str,
        setting(
            "python -m pytest --junitxml=/reports/junit.xml", "Test command run in the app image."
        ),
    ]
    test_env: Annotated[
        Mapping[str, str], setting("", "Test environment: NAME={service.fact} templates.", _pairs)
    ]
    test_mounts: Annotated[
        tuple[Mount, ...],
        setting("", "host-file-or-folder:/container/path[:ro], comma-separated.", _mounts),
    ]
    test_setup: Annotated[str, setting("", "Shell commands run before the tests, same container.")]
    test_workdir: Annotated[
        str, setting("", "Working directory for the tests; default: the image's.")
    ]
    reports_dir: Annotated[
        Path, setting("", "JUnit XML folder; default: the CI's, or reports.", _optional_folder)
    ]
    keep_services: Annotated[
        bool,
        setting(
            "no", "Keep services after test.run, for debugging.", _flag, flag="--keep-services"
        ),
    ]
    skip_dependencies: Annotated[
        bool,
        setting(
            "no",
            "Run only the tasks named on the command line, not their pre/post tasks.",
            _flag,
        ),
    ]
    secrets: Annotated[
        tuple[str, ...],
        setting(
            "", "Variables whose values are never printed, comma-separated names.", _variable_names
        ),
    ]
    registry: Annotated[
        str, setting("", "Registry to release to (host[:port]); empty: no release.", _registry)
    ]
    registry_user: Annotated[str, setting("", "Registry user; empty: an existing docker login.")]
    registry_password: Annotated[
        str, setting("", "Registry password or token; never printed.", secret=True)
    ] = field(repr=False)
    release_branches: Annotated[
        tuple[str, ...], setting("*", "Branches release.push pushes (globs).", _list)
    ]
    release_latest_branch: Annotated[str, setting("", "Branch whose pushes also get :latest.")]
    release_tags: Annotated[
        tuple[str, ...], setting("", "More tags; {git_tag} is the tag at HEAD, if any.", _list)
    ]
    push_retries: Annotated[
        int, setting("3", "Attempts per registry call on transient failures.", _whole_number(1, 10))
    ]
    push_timeout: Annotated[
        int,
        setting(
            "300", "Seconds a push or pull may take in all, retries included.",
            _whole_number(1, 86400),
        ),
    ]
    cache_backend: Annotated[
        CacheBackend,
        setting("dir", "dir (LAYERKEEP_CACHE_DIR) or registry.", _backend, flag="--backend"),
    ]
    cache_repository: Annotated[
        str, setting("", "Registry repository for cache tags (registry backend).")
    ]
    cache_fallback_branch: Annotated[
        str,
        setting(
            "", "Branch whose registry cache a branch without one loads; default: CI's, or main."
        ),
    ]
    cache_read_only: Annotated[
        ReadOnly,
        setting("no", "yes: never push to the registry cache; auto: not on pull requests.",
                _read_only),
    ]
    cache_mounts: Annotated[
        bool,
        setting("yes", "Keep BuildKit cache mounts (RUN --mount=type=cache) in the cache.", _flag),
    ]
    cache_mounts_max: Annotated[
        int,
        setting(
            "2GB", "Most cache-mount content kept (least recently saved dropped first).", _size
        ),
    ]

    def __repr__(self) -> str:
        # Pairs such as test_env may hold secrets: mask them here too.
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return mask(f"Settings({shown})", self.secret_values)

    def require_image(self) -> ImageRef:
        """The app image, or a one-line error saying how to set it."""
        if self.image is None:
            raise ConfigError(
                "LAYERKEEP_IMAGE is not set",
                key="LAYERKEEP_IMAGE",
                hint="set it in layerkeep.env or .env, e.g. LAYERKEEP_IMAGE=myorg/app, "
                "or pass --image",
            )
        return self.image

    def with_flags(self, **flags: str | None) -> Settings:
        """A copy with task flags on top (None or "" means "not given"), by field name.

        Everything derived is resolved again, and ``origins`` names the flag (the declared
        one, e.g. ``flag --backend`` for ``cache_backend``).
        """
        given = {f"{PREFIX}{name.upper()}": value for name, value in flags.items() if value}
        if not given:
            return self
        raw = dict(self._inputs.raw)
        for key, value in given.items():
            declared = KNOWN[key].flag if key in KNOWN else ""
            flag = declared or f"--{key.removeprefix(PREFIX).lower().replace('_', '-')}"
            _set(raw, key, Raw(value, f"flag {flag}", Source.FLAG))
        return _resolve(self.project_dir, replace(self._inputs, raw=raw))


@dataclass(frozen=True)
class Key:
    """One declared setting, as listings and the loader see it."""

    name: str
    field: str
    default: str
    doc: str
    parse: Callable[[str, Path], object]
    secret: bool
    # The task flag that sets it for one command ("--cache-dir"), or "" for none.
    flag: str = ""
    # Whether the setting is yes/no, so that its flag is a switch (--keep-services).
    switch: bool = False

    @property
    def param(self) -> str:
        """The flag's name as a task parameter: ``--cache-dir`` is ``cache_dir``."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def flag_help(self) -> str:
        """The flag's help text, from the setting's own doc: declared once."""
        return f"{self.doc.rstrip('.')}; sets {self.name} for every task of the command"

    def flag_text(self, value: object) -> str | None:
        """A flag's parsed value as a setting's text; None when the flag was not given."""
        if value is None or value is False or value == "":
            return None
        return "yes" if value is True else str(value)


def _declared() -> tuple[Key, ...]:
    hints = get_type_hints(Settings, include_extras=True)
    keys: list[Key] = []
    for each in fields(Settings):
        for d in getattr(hints[each.name], "__metadata__", ()):
            if isinstance(d, Declaration):
                name = f"{PREFIX}{each.name.upper()}"
                switch = hints[each.name].__origin__ is bool
                keys.append(
                    Key(name, each.name, d.default, d.doc, d.parse, d.secret, d.flag, switch)
                )
    return tuple(keys)


KEYS = _declared()
KNOWN = {key.name: key for key in KEYS}
# Task flags, by flag ("--image"): each sets its setting for every task of one command.
FLAGS = {key.flag: key for key in KEYS if key.flag}


# --- loading ------------------------------------------------------------------------


def env_file_paths(project_dir: Path, environ: Mapping[str, str]) -> tuple[Path, ...]:
    """The env files to read, lowest precedence first: ``LAYERKEEP_ENV_FILES`` or the default.

    ``LAYERKEEP_ENV_FILES`` is read from the process environment only (an env file cannot
    name the env files); its comma-separated paths are relative to the project or absolute,
    and an empty value reads none.
    """
    listed = environ.get(ENV_FILES_KEY)
    names = ENV_FILES if listed is None else parse_list(listed)
    return tuple(project_dir / name for name in names)


def load_settings(
    project_dir: Path,
    environ: Mapping[str, str],
    *,
    git_facts: Callable[[Path], ci_vars.GitFacts] = ci_vars.git_facts,
) -> Settings:
    """Read defaults, env files, ``environ`` (in that order) into validated settings."""
    raw: dict[str, Raw] = {key.name: Raw(key.default, "default", Source.DEFAULT) for key in KEYS}
    defined: dict[str, str] = {}
    read: list[Path] = []
    for path in env_file_paths(project_dir, environ):
        if not path.exists():
            continue
        for key, (value, where) in read_env_file(path, environ, defined).items():
            defined[key] = value
            if key == ENV_FILES_KEY:
                raise ConfigError(
                    f"{key} is read from the process environment only (found at {where})",
                    key=key,
                    hint="set it in the environment, e.g. in your CI's configuration",
                )
            if key.startswith(PREFIX):
                _set(raw, key, Raw(value, where, Source.ENV_FILE))
        read.append(path)
    for key, value in environ.items():
        if key.startswith(PREFIX) and key != ENV_FILES_KEY:
            _set(raw, key, Raw(value, "environment", Source.ENVIRONMENT))
    fallbacks = _fallbacks(project_dir, raw, environ, git_facts)
    return _resolve(project_dir, _Inputs(raw, dict(environ), fallbacks, tuple(read)))


def _set(raw: dict[str, Raw], key: str, value: Raw) -> None:
    """Record ``value`` unless a higher source already set the key: precedence in one place."""
    current = raw.get(key)
    if current is None or value.source >= current.source:
        raw[key] = value


def _fallbacks(
    project_dir: Path,
    raw: Mapping[str, Raw],
    environ: Mapping[str, str],
    git_facts: Callable[[Path], ci_vars.GitFacts],
) -> dict[str, tuple[object, str]]:
    ci = ci_vars.detect(environ)
    found: dict[str, tuple[object, str]] = {
        "project": (project_dir.resolve().name, "default (the folder's name)"),
        "build_id": (ci.build_id, "default (CI variables)")
        if ci.build_id
        else ("local", "default (no CI found)"),
        "reports_dir": (Path(ci.reports_dir), "default (CI variables)")
        if ci.reports_dir
        else (project_dir / "reports", "default"),
        "commit": (ci.commit, "default (CI variables)"),
        "branch": (ci.branch, "default (CI variables)"),
        "pull_request": (ci.pull_request, "default (CI variables)"),
        "cache_fallback_branch": (ci.default_branch, "default (CI variables)")
        if ci.default_branch
        else ("main", "default"),
    }
    missing = [
        name
        for name in ("commit", "branch")
        if not found[name][0] and not raw[f"{PREFIX}{name.upper()}"].text.strip()
    ]
    if missing:
        facts = git_facts(project_dir)
        for name in missing:
            found[name] = (getattr(facts, name), "default (git)")
    return found


def _resolve(project_dir: Path, inputs: _Inputs) -> Settings:
    """Validate the raw values and derive the rest; every error names the key and its source."""
    raw = inputs.raw
    names = cast(tuple[str, ...], _parse(KNOWN[f"{PREFIX}SERVICES"], raw, project_dir))
    _reject_unknown(raw, names)
    parsed: dict[str, Any] = {key.field: _parse(key, raw, project_dir) for key in KEYS}
    origins = {key: value.where for key, value in raw.items()}
    for name, (value, where) in inputs.fallbacks.items():
        # Only an empty setting takes the fallback: LAYERKEEP_PULL_REQUEST=no stays no.
        if not raw[f"{PREFIX}{name.upper()}"].text.strip():
            parsed[name] = value
            origins[f"{PREFIX}{name.upper()}"] = where
    parsed["services"] = _parse_services(raw, names, parsed)
    if not parsed["test_env"]:
        parsed["test_env"] = default_test_env(parsed["services"], parsed["db_service"])
        origins[f"{PREFIX}TEST_ENV"] = "default (from the services)"
    check_templates(parsed["test_env"], parsed["services"], raw[f"{PREFIX}TEST_ENV"].where)
    return Settings(
        project_dir=project_dir,
        secret_values=_secret_values(parsed, raw, inputs.environ),
        env_files=inputs.env_files,
        origins=origins,
        _inputs=inputs,
        **parsed,
    )


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


def _parse(key: Key, raw: Mapping[str, Raw], project_dir: Path) -> object:
    value = raw[key.name]
    try:
        return key.parse(value.text, project_dir)
    except Invalid as error:
        raise ConfigError(
            f"{key.name}={_quoted(key.name, value.text, secret=key.secret)} "
            f"(from {value.where}) is not valid",
            key=key.name,
            hint=str(error),
        ) from None


# Settings whose text is NAME=value pairs: they may carry secrets, so errors leave
# their text out.
_PAIRS_SUFFIX = ("_ENV", "_BUILD_ARGS")


def _quoted(name: str, text: str, *, secret: bool = False) -> str:
    """The text of ``name`` as an error shows it: quoted, or masked if it may hold a secret."""
    return MASK if secret or name.endswith(_PAIRS_SUFFIX) else repr(text)


def _reject_unknown(raw: Mapping[str, Raw], services: tuple[str, ...]) -> None:
    described = set(services) | set(KNOWN_KINDS)
    allowed = set(KNOWN) | {service_key(name, suffix) for name in described for suffix in SUFFIXES}
    for key, value in raw.items():
        if key in allowed:
            continue
        near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.9)
        suffix = next((x for x in SUFFIXES if key.endswith(f"_{x}")), "")
        service = key[len(PREFIX) : -len(suffix) - 1] if suffix else ""
        close = difflib.get_close_matches(key, allowed, n=1)
        if near:
            hint = f"did you mean {near[0]}?"
        elif service:
            hint = f"add {service.lower().replace('_', '-')} to LAYERKEEP_SERVICES to describe it"
        elif close:
            hint = f"did you mean {close[0]}?"
        else:
            hint = "see .env.example for every key"
        raise ConfigError(f"unknown setting {key} (from {value.where})", key=key, hint=hint)


def _parse_services(
    raw: Mapping[str, Raw], names: tuple[str, ...], parsed: Mapping[str, Any]
) -> tuple[ServiceSpec, ...]:
    postgres_env = {"POSTGRES_USER": parsed["db_user"], "POSTGRES_PASSWORD": parsed["db_password"]}
    services: list[ServiceSpec] = []
    for name in names:

        def get(suffix: str, name: str = name) -> str:
            value = raw.get(service_key(name, suffix))
            return value.text if value else ""

        try:
            services.append(parse_service(name, get, postgres_env=postgres_env))
        except Invalid as error:
            key = service_key(name, error.suffix)
            value = raw.get(key, Raw("", "default", Source.DEFAULT))
            raise ConfigError(
                f"{key}={_quoted(key, value.text)} (from {value.where}) is not valid",
                key=key,
                hint=str(error),
            ) from None
    return tuple(services)


# --- secrets --------------------------------------------------------------------------


def is_secret_name(name: str, listed: Collection[str]) -> bool:
    """Whether the variable ``name`` holds a secret: listed in LAYERKEEP_SECRETS, or named so."""
    return name in listed or any(marker in name.upper() for marker in SECRET_MARKERS)


def _secret_values(
    parsed: Mapping[str, Any], raw: Mapping[str, Raw], environ: Mapping[str, str]
) -> tuple[str, ...]:
    listed: tuple[str, ...] = parsed["secrets"]
    values = {parsed["registry_password"], parsed["db_password"]}
    values.update(environ[name] for name in listed if name in environ)
    secrets: tuple[BuildSecret, ...] = parsed["build_secrets"]
    values.update(environ[s.variable] for s in secrets if s.variable in environ)
    specs: tuple[ServiceSpec, ...] = parsed["services"]
    for env in (parsed["test_env"], parsed["build_args"], *(spec.env for spec in specs)):
        values.update(value for name, value in env.items() if is_secret_name(name, listed))
    values.discard("")
    # The built-in password is public (.env.example shows it), and masking it would
    # also mask "layerkeep" in every container name.
    if raw[f"{PREFIX}DB_PASSWORD"].source == Source.DEFAULT:
        values.discard(parsed["db_password"])
    return tuple(sorted(values, key=lambda value: (-len(value), value)))


def secret_build_args(settings: Settings) -> list[str]:
    """The build args that hold a secret: named so, listed, or a value that is masked."""
    return [
        name
        for name, value in settings.build_args.items()
        if value and (is_secret_name(name, settings.secrets) or value in settings.secret_values)
    ]


def mask(text: str, secret_values: Collection[str]) -> str:
    """``text`` with every secret value replaced by ****; pass longest values first."""
    for value in secret_values:
        text = text.replace(value, MASK)
    return text


# --- the settings view ----------------------------------------------------------------


class SettingRow(NamedTuple):
    """One line of the settings view."""

    name: str
    value: str
    origin: str
    doc: str


def describe_settings(settings: Settings) -> list[SettingRow]:
    """Every resolved setting, with secrets masked, where it came from, and what it means.

    The declared settings come first, in declaration order, then the keys of each
    configured service.
    """
    rows: list[SettingRow] = []
    for key in KEYS:
        value = getattr(settings, key.field)
        if key.secret:
            text = MASK if value else ""
        elif isinstance(value, Mapping):
            text = _show_pairs(value, settings)
        else:
            text = mask(_show(value), settings.secret_values)
        rows.append(SettingRow(key.name, text, settings.origins.get(key.name, "default"), key.doc))
    for spec in settings.services:
        shown = {
            "IMAGE": spec.image,
            "KIND": spec.kind,
            "ENV": _show_pairs(spec.env, settings),
            "COMMAND": mask(spec.command, settings.secret_values),
            "READY": mask(spec.ready, settings.secret_values),
            "CONTAINER_PORT": _show(spec.container_port),
            "PORT": _show(spec.host_port),
            "TIMEOUT": f"{spec.timeout:g}",
        }
        for service_setting in SERVICE_KEYS:
            name = service_key(spec.name, service_setting.suffix)
            origin = settings.origins.get(name, "default")
            rows.append(
                SettingRow(name, shown[service_setting.suffix], origin, service_setting.doc)
            )
    return rows


def _show_pairs(pairs: Mapping[str, str], settings: Settings) -> str:
    def shown(name: str, value: str) -> str:
        if is_secret_name(name, settings.secrets):
            return MASK
        return mask(value, settings.secret_values)

    return ",".join(f"{name}={shown(name, value)}" for name, value in pairs.items())


def _show(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(_show(item) for item in value)
    if isinstance(value, Mount):
        return f"{value.source}:{value.target}{':ro' if value.read_only else ''}"
    if isinstance(value, ServiceSpec):
        return value.name
    return str(value)


# --- the test environment's templates -------------------------------------------------

_TEMPLATE = re.compile(r"\{([a-z][a-z0-9-]*)\.([a-z_]+)\}")
FACTS = ("host", "port", "user", "password", "database", "url")


def default_test_env(services: tuple[ServiceSpec, ...], db_service: str) -> dict[str, str]:
    """DATABASE_URL for the database service and REDIS_URL for the first redis."""
    env: dict[str, str] = {}
    if any(s.name == db_service and s.kind == "postgres" for s in services):
        env["DATABASE_URL"] = f"{{{db_service}.url}}"
    redis = next((s for s in services if s.kind == "redis"), None)
    if redis is not None:
        env["REDIS_URL"] = f"{{{redis.name}.url}}"
    return env


def check_templates(env: Mapping[str, str], services: tuple[ServiceSpec, ...], where: str) -> None:
    """Every ``{service.fact}`` in the test environment names a service and a known fact."""
    names = {service.name for service in services}
    for variable, template in env.items():
        for service, fact in _TEMPLATE.findall(template):
            if service not in names or fact not in FACTS:
                raise ConfigError(
                    f"LAYERKEEP_TEST_ENV: {variable} (from {where}) names "
                    f"{{{service}.{fact}}}",
                    key="LAYERKEEP_TEST_ENV",
                    hint=f"services: {', '.join(sorted(names)) or 'none'}; "
                    f"facts: {', '.join(FACTS)}",
                )


def render_template(template: str, facts: Mapping[str, Mapping[str, str]]) -> str:
    """Fill ``{service.fact}`` placeholders from ``facts[service][fact]``."""
    return _TEMPLATE.sub(lambda match: facts[match[1]][match[2]], template)
