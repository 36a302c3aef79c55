"""Checks before a run starts anything: what the settings and the files already tell.

Each check belongs to the tasks that would fail on it later, after minutes of work:
a test mount that does not exist stops ``test.run`` only once services are up and the
database is ready; a BuildKit-only Dockerfile under the classic builder fails a few
steps in and leaves untagged images. :func:`preflight` finds those first, reading files
and settings only; the one slow check (which docker CLI can use BuildKit, a few
subprocesses) runs only when the Dockerfile needs BuildKit. :func:`preflight_warnings`
finds what only costs time (``.git`` sent to the builder) and does not stop the run; with
LAYERKEEP_BUILDER=auto it asks which CLI builds only when there is a
``<Dockerfile>.dockerignore`` (which BuildKit reads instead of ``.dockerignore``).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from layerkeep.building.builder import buildkit_cli
from layerkeep.building.context import ignore_file, preflight_context
from layerkeep.building.dockerfile import directives, read_instructions
from layerkeep.building.image import unset_secret_variables
from layerkeep.core.engine import context_files, read_ignore_file
from layerkeep.core.errors import ConfigError
from layerkeep.core.log import Log
from layerkeep.core.settings import Settings
from layerkeep.testrun.split import plan_tests

# The tasks whose problems are checked here; a run of other tasks skips preflight.
BUILDS = frozenset({"image.build"})
NEED_IMAGE = frozenset({"image.build", "cache.save", "db.init", "test.run", "release.push"})
CHECKED = NEED_IMAGE

# The flags only BuildKit reads, per instruction.
_COPY_FLAGS = ("link", "chmod", "parents", "checksum", "keep-git-dir")
_BUILDKIT_FLAGS = {"RUN": ("mount", "network", "security"), "COPY": _COPY_FLAGS, "ADD": _COPY_FLAGS}
_HEREDOC = re.compile(r"^(?:RUN|COPY|ADD)\s.*?(?<!<)<<-?\s*[\"']?[A-Za-z_]\w*[\"']?", re.I)
# Frontends that read Dockerfiles: the classic builder reads the same language.
_DOCKERFILE_FRONTEND = re.compile(r"^(?:docker\.io/)?docker/dockerfile(?::\S*)?(?:@\S+)?$")


def needs_preflight(tasks: Collection[str]) -> bool:
    """Whether any of these task titles has something preflight checks."""
    return not CHECKED.isdisjoint(tasks)


def preflight(
    settings: Settings,
    tasks: Collection[str],
    environ: Mapping[str, str],
    *,
    flags: Collection[str] = (),
) -> list[str]:
    """One line per problem the run of ``tasks`` (titles) would meet, each with its fix.

    An empty list means nothing found; ``environ`` is where docker CLIs are looked for.
    ``flags`` names settings a task flag of this run may still set (e.g. "image" for
    `inv image.build --image ...`): checks of those are left to the task.
    """
    problems: list[str] = []
    if not NEED_IMAGE.isdisjoint(tasks) and settings.image is None and "image" not in flags:
        problems.append(
            "LAYERKEEP_IMAGE is not set: set it in layerkeep.env, e.g. "
            "LAYERKEEP_IMAGE=myorg/app (or pass --image to image.build)"
        )
    if not BUILDS.isdisjoint(tasks):
        problems += _build_problems(settings, environ, check_builder="builder" not in flags)
    if "db.init" in tasks:
        problems += _database_problems(settings)
    if "test.run" in tasks:
        problems += _mount_problems(settings) + _split_problems(settings)
    return problems


def preflight_warnings(
    settings: Settings, tasks: Collection[str], environ: Mapping[str, str]
) -> list[str]:
    """One line per thing that costs the run of ``tasks`` (titles) time without stopping
    it, each with its fix."""
    if BUILDS.isdisjoint(tasks):
        return []
    found = _git_in_context(settings, environ)
    return [found] if found else []


def check_before_start(
    settings: Settings,
    tasks: Collection[str],
    environ: Mapping[str, str],
    *,
    flags: Collection[str] = (),
    log: Log,
) -> None:
    """Log each warning and each problem :func:`preflight` finds, then raise one
    ConfigError for the problems."""
    for warning in preflight_warnings(settings, tasks, environ):
        log(f"preflight: warning: {warning}")
    problems = preflight(settings, tasks, environ, flags=flags)
    if not problems:
        return
    for problem in problems:
        log(f"preflight: {problem}")
    more = f" (and {len(problems) - 1} more, listed above)" if len(problems) > 1 else ""
    raise ConfigError(f"nothing was started: {problems[0]}{more}")


def _build_problems(
    settings: Settings, environ: Mapping[str, str], *, check_builder: bool
) -> list[str]:
    context = settings.context
    if not context.is_dir():
        return [
            f"LAYERKEEP_CONTEXT: build context {context} is not a folder: set "
            "LAYERKEEP_CONTEXT to the folder holding your sources (relative to the project)"
        ]
    dockerfile = context / settings.dockerfile
    try:
        text = dockerfile.read_text(encoding="utf-8")
    except OSError as error:
        return [
            f"LAYERKEEP_DOCKERFILE: cannot read {dockerfile} ({error.strerror or error}): set "
            "LAYERKEEP_DOCKERFILE, relative to LAYERKEEP_CONTEXT"
        ]
    except UnicodeDecodeError:
        return [f"LAYERKEEP_DOCKERFILE: {dockerfile} is not UTF-8 text: save it as UTF-8"]
    problems = preflight_context(settings) + _secret_problems(settings, environ)
    features = buildkit_features(text)
    if not features or settings.builder == "buildkit" or not check_builder:
        # LAYERKEEP_BUILDER=buildkit without a usable CLI is image.build's own error.
        return problems
    uses = f"{dockerfile.name} uses {features[0]}" + (
        f" (and {len(features) - 1} more BuildKit-only feature(s))" if len(features) > 1 else ""
    )
    if settings.builder == "legacy":
        problems.append(
            f"LAYERKEEP_BUILDER=legacy (from {_origin(settings, 'LAYERKEEP_BUILDER')}) cannot "
            f"build it: {uses}, which only BuildKit runs: set LAYERKEEP_BUILDER=auto or "
            "buildkit"
        )
    elif buildkit_cli(settings.docker_cli, environ) is None:
        problems.append(
            f"{uses}, which only BuildKit runs, and LAYERKEEP_BUILDER=auto found no docker CLI "
            "here that can use BuildKit: install docker-buildx (Docker 23+) or point "
            "LAYERKEEP_DOCKER_CLI at a docker 18-22 CLI"
        )
    return problems


def buildkit_features(text: str) -> list[str]:
    """What in this Dockerfile only BuildKit can build, each as a short quote."""
    found: list[str] = []
    syntax = directives(text).get("syntax")
    if syntax and not _DOCKERFILE_FRONTEND.match(syntax):
        found.append(f"the frontend `# syntax={syntax}`")
    for instruction in read_instructions(text):
        keyword = instruction.keyword
        only = _BUILDKIT_FLAGS.get(keyword, ())
        flag = next((name for name, _ in instruction.flags if name in only), None)
        if flag:
            found.append(f"`{keyword} --{flag}`")
        elif _HEREDOC.match(instruction.text):
            found.append(f"a heredoc (`{_short(instruction.text)}`)")
    return found


def _git_in_context(settings: Settings, environ: Mapping[str, str]) -> str | None:
    """A warning when the build sends ``.git``: every commit (and a `git status`) rewrites
    files in it, so a `COPY .` misses on every build."""
    context = settings.context
    dockerfile = context / settings.dockerfile
    if not (context / ".git").is_dir() or not dockerfile.is_file():
        return None  # no .git, or no build: nothing to say (a missing Dockerfile is a problem)
    # Which ignore file the builder reads; auto is resolved only when it matters (a
    # `<Dockerfile>.dockerignore` there), being a few subprocesses. A --builder flag may
    # still change the builder: a warning goes by the settings.
    kinds = {"legacy", "buildkit"} if settings.builder == "auto" else {settings.builder}
    files = {ignore_file(context, dockerfile, kind) for kind in kinds}
    if len(files) > 1:
        kind = "buildkit" if buildkit_cli(settings.docker_cli, environ) else "legacy"
        files = {ignore_file(context, dockerfile, kind)}
    [rules_file] = files
    if not _sends_git(context, read_ignore_file(rules_file)):
        return None
    name = _shown(rules_file, settings.project_dir)
    if rules_file.is_file():
        why, fix = f"{name} does not leave it out", f"add the line `.git` to {name}"
    else:
        why, fix = f"there is no {name} to leave it out", f"create {name} with the line `.git`"
    return (
        f"the build context holds .git ({_megabytes(context / '.git')}) and {why}: every "
        "commit changes .git, so a `COPY .` misses the cache on every build, and each build "
        f"sends it to the builder: {fix}"
    )


def _sends_git(context: Path, rules: Sequence[str]) -> bool:
    """Whether a build with these ignore rules gets anything in ``.git``.

    The matcher (docker-py's, which builds use) answers by walking a folder, and a walk of
    the whole context can take seconds; so it walks an empty stand-in for .git's own
    entries (same names, same kinds) in a temporary folder: the same answer for them.
    """
    with tempfile.TemporaryDirectory(prefix="layerkeep-preflight-") as folder:
        stand_in = Path(folder) / ".git"
        stand_in.mkdir()
        for entry in os.scandir(context / ".git"):
            if entry.is_dir(follow_symlinks=False):
                (stand_in / entry.name).mkdir()
            else:
                (stand_in / entry.name).touch()
        seen = context_files(Path(folder), rules)
    return any(path.startswith(".git/") for path in seen)


def _megabytes(folder: Path) -> str:
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue  # git may remove a file meanwhile
    return f"{total / 1e6:.1f} MB"


def _shown(path: Path, project: Path) -> str:
    """``path`` relative to the project when inside it."""
    try:
        return path.relative_to(project).as_posix()
    except ValueError:
        return str(path)


def _secret_problems(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """The build secrets whose variable this environment lacks (found before the build
    rather than after the cache was restored)."""
    missing = unset_secret_variables(settings, environ)
    if not missing:
        return []
    return [
        f"LAYERKEEP_BUILD_SECRETS names {', '.join(missing)}, not set in the environment: "
        "set it (your CI's secrets) or leave it out of LAYERKEEP_BUILD_SECRETS"
    ]


def _database_problems(settings: Settings) -> list[str]:
    problems: list[str] = []
    service = next((s for s in settings.services if s.name == settings.db_service), None)
    initialises = settings.db_init_sql or settings.db_init_command
    if service is None and initialises:
        what = "LAYERKEEP_DB_INIT_COMMAND" if settings.db_init_command else "LAYERKEEP_DB_INIT_SQL"
        problems.append(
            f"{what} is set but LAYERKEEP_SERVICES has no {settings.db_service!r} "
            "(LAYERKEEP_DB_SERVICE), so db.init would skip it: add postgres to "
            "LAYERKEEP_SERVICES, or set LAYERKEEP_DB_SERVICE to your postgres service"
        )
    elif service is not None and service.kind != "postgres":
        problems.append(
            f"LAYERKEEP_DB_SERVICE={settings.db_service!r} is a {service.kind} service, "
            "not postgres: set LAYERKEEP_DB_SERVICE to your postgres service"
        )
    if service is not None:
        problems += [
            f"LAYERKEEP_DB_INIT_SQL: {path} does not exist: paths are relative to the "
            f"project folder {settings.project_dir}"
            for path in settings.db_init_sql
            if not path.is_file()
        ]
    return problems


def _mount_problems(settings: Settings) -> list[str]:
    return [
        f"LAYERKEEP_TEST_MOUNTS: {mount.source} (for {mount.target}) does not exist: "
        f"paths are relative to the project folder {settings.project_dir}"
        for mount in settings.test_mounts
        if not mount.source.exists()
    ]


def _split_problems(settings: Settings) -> list[str]:
    """What stops test.run's split (LAYERKEEP_TEST_FILES, the nodes), found by planning it."""
    try:
        plan_tests(settings, {}, log=lambda _: None)
    except ConfigError as error:
        return [error.one_line()]
    return []


def _origin(settings: Settings, key: str) -> str:
    return settings.origins.get(key, "default")


def _short(instruction: str, limit: int = 40) -> str:
    return instruction if len(instruction) <= limit else f"{instruction[: limit - 3]}..."
