"""Loading the settings: defaults, env files, the environment and flags, resolved once.

Precedence, lowest first (see precedence.Source): built-in defaults < env files < the
process environment < task flags. Values that stand in for empty settings (the CI's
build id, commit and branch, else git's; the folder's name) are found once, at load
time. Every error names the key and where its value came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

from layerkeep.core import ci_vars
from layerkeep.core.errors import ConfigError
from layerkeep.core.secrets import MASK
from layerkeep.core.service_specs import (
    KNOWN_KINDS,
    SUFFIXES,
    ServiceSpec,
    parse_service,
    service_key,
)
from layerkeep.core.settings import secret_values
from layerkeep.core.settings.declarations import KEYS, KNOWN, PREFIX, Key, Settings
from layerkeep.core.settings.env_files import ENV_FILES_KEY, read_env_files
from layerkeep.core.settings.precedence import Raw, Source, put
from layerkeep.core.settings.templates import check_templates, default_test_env
from layerkeep.core.values import Invalid


def load_settings(
    project_dir: Path,
    environ: Mapping[str, str],
    *,
    git_facts: Callable[[Path], ci_vars.GitFacts] = ci_vars.git_facts,
) -> Settings:
    """Read defaults, env files, ``environ`` (in that order) into validated settings."""
    raw: dict[str, Raw] = {key.name: Raw(key.default, "default", Source.DEFAULT) for key in KEYS}
    env_files = read_env_files(project_dir, environ)
    for key, (value, where) in env_files.values.items():
        if key.startswith(PREFIX):
            put(raw, key, Raw(value, where, Source.ENV_FILE))
    for key, value in environ.items():
        if key.startswith(PREFIX) and key != ENV_FILES_KEY:
            put(raw, key, Raw(value, "environment", Source.ENVIRONMENT))
    fallbacks = _fallbacks(project_dir, raw, environ, git_facts)
    return _resolve(_Inputs(project_dir, raw, dict(environ), fallbacks, env_files.read))


@dataclass(frozen=True)
class _Inputs:
    """What settings are resolved from: kept on them, so that flags resolve all again."""

    project_dir: Path
    raw: Mapping[str, Raw]
    environ: Mapping[str, str]
    # Values that stand in for empty settings (from the CI, git, the folder's name),
    # found once at load time, with where they came from.
    fallbacks: Mapping[str, tuple[object, str]]
    env_files: tuple[Path, ...]

    def with_flags(self, flags: Mapping[str, str]) -> Settings:
        """The settings resolved again with ``flags`` (field name -> text) on top."""
        raw = dict(self.raw)
        for name, value in flags.items():
            key = f"{PREFIX}{name.upper()}"
            declared = KNOWN[key].flag if key in KNOWN else ""
            flag = declared or f"--{name.lower().replace('_', '-')}"
            put(raw, key, Raw(value, f"flag {flag}", Source.FLAG))
        return _resolve(replace(self, raw=raw))


def _fallbacks(
    project_dir: Path,
    raw: Mapping[str, Raw],
    environ: Mapping[str, str],
    git_facts: Callable[[Path], ci_vars.GitFacts],
) -> dict[str, tuple[object, str]]:
    """What stands in for empty settings, with where it came from: the CI's, else git's."""
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
        "node_index": (ci.node_index, "default (CI variables)")
        if ci.node_total
        else (1, "default"),
        "node_total": (ci.node_total, "default (CI variables)")
        if ci.node_total
        else (1, "default"),
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



def _resolve(inputs: _Inputs) -> Settings:
    """Validate the raw values and derive the rest; every error names the key and its source."""
    raw, project_dir = inputs.raw, inputs.project_dir
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
        secret_values=secret_values.collect(parsed, raw, inputs.environ),
        env_files=inputs.env_files,
        origins=origins,
        _inputs=inputs,
        **parsed,
    )


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
