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

from layerkeep.core import ci_vars
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import ImageRef, parse_image_ref
from layerkeep.core.service_specs import (
    KNOWN_KINDS,
    SUFFIXES,
    ServiceSpec,
    parse_names,
    parse_service,
    service_key,
)
from layerkeep.core.values import Invalid, parse_bool, parse_list, parse_pairs

PREFIX = "LAYERKEEP_"
ENV_FILES = (".env", ".env.local")
Builder = Literal["auto", "legacy", "buildkit"]
BUILDERS: tuple[Builder, ...] = ("auto", "legacy", "buildkit")
CacheBackend = Literal["dir", "registry"]
CACHE_BACKENDS: tuple[CacheBackend, ...] = ("dir", "registry")


class Source(IntEnum):
    """Where a value came from; a higher source overrides a lower one."""

    DEFAULT = 0
    ENV_FILE = 1
    ENV_LOCAL_FILE = 2
    ENVIRONMENT = 3
    FLAG = 4


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


def _pairs(value: str, _: Path) -> dict[str, str]:
    return parse_pairs(value)


def _flag(value: str, _: Path) -> bool:
    return parse_bool(value)


def _services(value: str, _: Path) -> tuple[str, ...]:
    return parse_names(value)


def _files(value: str, project_dir: Path) -> tuple[Path, ...]:
    return tuple(project_dir / item for item in parse_list(value))


def _list(value: str, _: Path) -> tuple[str, ...]:
    return parse_list(value)


_REGISTRY = re.compile(r"^[a-zA-Z0-9.-]+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")


def _registry(value: str, _: Path) -> str:
    text = value.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
    if text and not _REGISTRY.match(text):
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
            raise Invalid(f"{item!r}: write host-folder:/container/path[:ro], comma-separated")
        mounts.append(Mount(project_dir / parts[0], parts[1], read_only=mode == "ro"))
    return tuple(mounts)


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
        if not value.strip().isdigit() or not low <= int(value) <= high:
            raise Invalid(f"use a whole number from {low} to {high}")
        return int(value)

    return parse


@dataclass(frozen=True)
class Mount:
    """A host folder mounted into the test container."""

    source: Path
    target: str
    read_only: bool = False


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
    Key("LAYERKEEP_BUILD_ARGS", "", "Build arguments: comma-separated NAME=value.", _pairs),
    Key("LAYERKEEP_BUILDER", "auto", "auto (BuildKit if it works), legacy or buildkit.", _builder),
    Key("LAYERKEEP_DOCKER_CLI", "", "docker CLI for BuildKit builds; default: one that works."),
    Key("LAYERKEEP_DOCKER_TIMEOUT", "120", "Seconds per Docker API call.", _whole_number(1, 3600)),
    Key("LAYERKEEP_CACHE_DIR", ".layerkeep-cache", "Folder holding the layer cache.", _folder),
    Key("LAYERKEEP_CACHE_IMAGES", "", "More images to cache, comma-separated.", _images),
    Key("LAYERKEEP_CACHE_LEVEL", "3", "zstd level of cached layers.", _whole_number(1, 19)),
    Key("LAYERKEEP_BUILD_ID", "", "Id of this CI job; default: the CI's own, else 'local'."),
    Key("LAYERKEEP_COMMIT", "", "Commit SHA; default: the CI's own variable, else git."),
    Key("LAYERKEEP_BRANCH", "", "Branch name; default: the CI's own variable, else git."),
    Key("LAYERKEEP_SERVICES", "", "Service containers, e.g. postgres,redis.", _services),
    Key("LAYERKEEP_SWEEP_AFTER", "3600", "services.sweep removes leftovers older than this (s).",
        _whole_number(0, 10**7)),
    Key("LAYERKEEP_DB_SERVICE", "postgres", "The postgres service db.init prepares."),
    Key("LAYERKEEP_DB_NAME", "app_test", "Database db.init creates if missing."),
    Key("LAYERKEEP_DB_USER", "postgres", "Database user (the postgres service's superuser)."),
    Key("LAYERKEEP_DB_PASSWORD", "layerkeep", "Its password; never printed."),
    Key("LAYERKEEP_DB_INIT_SQL", "", "SQL files db.init runs, comma-separated.", _files),
    Key("LAYERKEEP_DB_INIT_COMMAND", "", "Command db.init runs in the app image."),
    Key("LAYERKEEP_TEST_COMMAND", "python -m pytest --junitxml=/reports/junit.xml",
        "Test command run in the app image."),
    Key("LAYERKEEP_TEST_ENV", "", "Test environment: NAME={service.fact} templates.", _pairs),
    Key("LAYERKEEP_TEST_MOUNTS", "", "host-folder:/container/path[:ro], comma-separated.",
        _mounts),
    Key("LAYERKEEP_TEST_SETUP", "", "Shell commands run before the tests, same container."),
    Key("LAYERKEEP_TEST_WORKDIR", "", "Working directory for the tests; default: the image's."),
    Key("LAYERKEEP_REPORTS_DIR", "", "JUnit XML folder; default: the CI's, or reports.",
        _optional_folder),
    Key("LAYERKEEP_KEEP_SERVICES", "no", "Keep services after test.run, for debugging.", _flag),
    Key("LAYERKEEP_REGISTRY", "", "Registry to release to (host[:port]); empty: no release.",
        _registry),
    Key("LAYERKEEP_REGISTRY_USER", "", "Registry user; empty: an existing docker login."),
    Key("LAYERKEEP_REGISTRY_PASSWORD", "", "Registry password or token; never printed."),
    Key("LAYERKEEP_RELEASE_BRANCHES", "*", "Branches release.push pushes (globs).", _list),
    Key("LAYERKEEP_RELEASE_LATEST_BRANCH", "", "Branch whose pushes also get :latest."),
    Key("LAYERKEEP_RELEASE_TAGS", "", "More tags; {git_tag} is the tag at HEAD, if any.", _list),
    Key("LAYERKEEP_PUSH_RETRIES", "3", "Attempts per registry call on transient failures.",
        _whole_number(1, 10)),
    Key("LAYERKEEP_CACHE_BACKEND", "dir", "dir (LAYERKEEP_CACHE_DIR) or registry.", _backend),
    Key("LAYERKEEP_CACHE_REPOSITORY", "", "Registry repository for cache tags (registry backend)."),
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
    services: tuple[ServiceSpec, ...]
    sweep_after: int
    db_service: str
    db_name: str
    db_user: str
    db_password: str = field(repr=False)
    db_init_sql: tuple[Path, ...]
    db_init_command: str
    test_command: str
    test_env: Mapping[str, str]
    test_mounts: tuple[Mount, ...]
    test_setup: str
    test_workdir: str
    reports_dir: Path
    keep_services: bool
    registry: str
    registry_user: str
    registry_password: str = field(repr=False)
    release_branches: tuple[str, ...]
    release_latest_branch: str
    release_tags: tuple[str, ...]
    push_retries: int
    cache_backend: CacheBackend
    cache_repository: str
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
    services = _service_names(values)
    _reject_unknown(values, services)
    parsed = _parse_fields({k: v for k, v in values.items() if k in KNOWN}, project_dir)
    parsed["services"] = _parse_services(values, services, parsed)
    if not parsed["test_env"]:
        parsed["test_env"] = default_test_env(parsed["services"], parsed["db_service"])
    check_templates(parsed["test_env"], parsed["services"], values["LAYERKEEP_TEST_ENV"][1])
    project = parsed.pop("project") or project_dir.resolve().name
    ci = ci_vars.detect(environ)
    parsed["reports_dir"] = parsed["reports_dir"] or (
        Path(ci.reports_dir) if ci.reports_dir else project_dir / "reports"
    )
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


def _service_names(values: Mapping[str, tuple[str, str]]) -> tuple[str, ...]:
    value, where = values["LAYERKEEP_SERVICES"]
    try:
        return parse_names(value)
    except Invalid as error:
        raise ConfigError(
            f"LAYERKEEP_SERVICES={value!r} (from {where}) is not valid",
            key="LAYERKEEP_SERVICES",
            hint=str(error),
        ) from None


def _reject_unknown(values: Mapping[str, tuple[str, str]], services: tuple[str, ...]) -> None:
    described = set(services) | set(KNOWN_KINDS)
    allowed = set(KNOWN) | {service_key(name, suffix) for name in described for suffix in SUFFIXES}
    for key, (_, where) in values.items():
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
        raise ConfigError(f"unknown setting {key} (from {where})", key=key, hint=hint)


def _parse_services(
    values: Mapping[str, tuple[str, str]], names: tuple[str, ...], parsed: Mapping[str, Any]
) -> tuple[ServiceSpec, ...]:
    postgres_env = {"POSTGRES_USER": parsed["db_user"], "POSTGRES_PASSWORD": parsed["db_password"]}
    services: list[ServiceSpec] = []
    for name in names:

        def get(suffix: str, name: str = name) -> str:
            return values.get(service_key(name, suffix), ("", ""))[0]

        try:
            services.append(parse_service(name, get, postgres_env=postgres_env))
        except Invalid as error:
            key = service_key(name, error.suffix)
            value, where = values.get(key, ("", "default"))
            raise ConfigError(
                f"{key}={value!r} (from {where}) is not valid", key=key, hint=str(error)
            ) from None
    return tuple(services)


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
                    f"LAYERKEEP_TEST_ENV: {variable}={template!r} (from {where}) names "
                    f"{{{service}.{fact}}}",
                    key="LAYERKEEP_TEST_ENV",
                    hint=f"services: {', '.join(sorted(names)) or 'none'}; "
                    f"facts: {', '.join(FACTS)}",
                )


def render_template(template: str, facts: Mapping[str, Mapping[str, str]]) -> str:
    """Fill ``{service.fact}`` placeholders from ``facts[service][fact]``."""
    return _TEMPLATE.sub(lambda match: facts[match[1]][match[2]], template)


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
