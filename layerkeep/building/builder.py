"""Which builder builds here: the classic builder through the API, or BuildKit via a CLI.

A docker CLI with the buildx plugin comes first (Docker 23+ builds with it); then a
classic CLI (18-22) that speaks BuildKit itself when DOCKER_BUILDKIT=1; else the classic
builder through the engine's API. Each CLI is asked once per run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError


@dataclass(frozen=True)
class Builder:
    """How images get built: the classic builder through the API, or BuildKit via a CLI.

    ``exports_cache``: BuildKit here can export its own cache (``--cache-to``): buildx
    on the containerd image store. Then the cache is BuildKit's, not images.
    """

    kind: str
    cli: str = ""
    exports_cache: bool = False


def choose_builder(
    wanted: str, environ: Mapping[str, str], *, cli: str = "", engine: Engine
) -> Builder:
    """Resolve ``auto``/``legacy``/``buildkit`` to a builder that works on this machine.

    A CLI with the buildx plugin comes first (Docker 23+ builds with it); then a classic
    CLI (18-22) that speaks BuildKit itself; else the classic builder through the API.
    """
    if wanted == "legacy":
        return Builder("legacy")
    engine_speaks = _engine_has_buildkit(engine)
    found = buildkit_cli(cli, environ) if engine_speaks else None
    if found is not None:
        exports = engine.uses_containerd_store() and _probed(_has_buildx, found, environ)
        return Builder("buildkit", found, exports_cache=exports)
    if wanted == "buildkit":
        tried = list(_cli_candidates(cli, environ)) if engine_speaks else []
        where = ", ".join(tried) or "no docker CLI on PATH"
        raise ConfigError(
            f"LAYERKEEP_BUILDER=buildkit but no docker CLI here can use BuildKit (tried {where})",
            key="LAYERKEEP_BUILDER",
            hint="install docker-buildx, set LAYERKEEP_DOCKER_CLI, or use LAYERKEEP_BUILDER=auto",
        )
    return Builder("legacy")


def buildkit_cli(cli: str, environ: Mapping[str, str]) -> str | None:
    """The docker CLI that builds with BuildKit here (``cli`` if given), or None.

    A CLI with the buildx plugin comes first, then a classic CLI (18-22). Engine-free, so
    that a run can check it before it starts.
    """
    candidates = list(_cli_candidates(cli, environ))
    for check in (_has_buildx, _speaks_buildkit):
        for candidate in candidates:
            if _probed(check, candidate, environ):
                return candidate
    return None


def _engine_has_buildkit(engine: Engine) -> bool:
    version = engine.server_version()
    api = tuple(int(part) for part in str(version.get("ApiVersion", "0.0")).split("."))
    return api >= (1, 39) and version.get("Os", "linux") == "linux"


def _cli_candidates(cli: str, environ: Mapping[str, str]) -> Iterable[str]:
    if cli:
        return [cli]
    found = [shutil.which("docker", path=environ.get("PATH")), "/usr/bin/docker"]
    unique: dict[str, None] = {}
    for path in found:
        if path and os.access(path, os.X_OK):
            unique.setdefault(os.path.realpath(path), None)
    return list(unique)


# What a CLI answered, per CLI and the variables that change the answer: preflight,
# cache.load and image.build of one run ask the same question.
_PROBES: dict[tuple[str, str, str, str | None, str | None, str | None], bool] = {}


def _probed(
    check: Callable[[str, Mapping[str, str]], bool], cli: str, environ: Mapping[str, str]
) -> bool:
    key = (
        check.__name__, cli, os.environ.get("PATH", ""),
        environ.get("PATH"), environ.get("DOCKER_CONFIG"), environ.get("HOME"),
    )
    if key not in _PROBES:
        _PROBES[key] = check(cli, environ)
    return _PROBES[key]


def _has_buildx(cli: str, environ: Mapping[str, str]) -> bool:
    """A CLI whose buildx plugin answers (it may live in DOCKER_CONFIG/cli-plugins)."""
    try:
        buildx = subprocess.run(
            [cli, "buildx", "version"], env=dict(environ), capture_output=True, check=False,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return buildx.returncode == 0


def _speaks_buildkit(cli: str, environ: Mapping[str, str]) -> bool:
    """A classic CLI (18-22) that builds with BuildKit itself when DOCKER_BUILDKIT=1."""
    env = dict(environ)
    try:
        version = subprocess.run(
            [cli, "version", "--format", "{{.Client.Version}}"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    major = version.stdout.strip().split(".")[0]
    return major.isdigit() and 18 <= int(major) < 23
