"""Build the app image and its named stages, reusing the cached images.

Each named stage is built first (``--target``), then the final image. What each build
gets as ``--cache-from`` depends on the builder:

- BuildKit merges every source it is given, so each build gets every cached image.
- The classic builder, per stage, follows the first source whose history matches the
  stage's first step, for the rest of that stage (moby's ``imageCache.GetCache``). Two
  stages that start alike (same base, ``WORKDIR``, ``COPY .``) would follow whichever
  image is listed first, and the other stage misses. So a stage build gets only its own
  image; the next builds get, before their own image, the parent chain of each stage
  image built so far, shortest first. A source matched at its *last* history entry is
  used without that lock, so the shared first steps come from those chain images one at
  a time, and the first step that differs locks onto the image that has it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from layerkeep.building.context import context_excludes, dockerfile_with_excludes
from layerkeep.building.dockerfile import read_stages
from layerkeep.building.explain import explain_misses
from layerkeep.building.output import BuildkitParser, LegacyParser, ReuseSource, StepTally
from layerkeep.building.step_inputs import engine_lookup
from layerkeep.core.engine import Engine, image_layers
from layerkeep.core.errors import BuildFailed, ConfigError, ResourceConflict
from layerkeep.core.imageref import ImageRef, is_valid_tag
from layerkeep.core.registry_failures import OFFLINE_HINT, unreachable_registry
from layerkeep.core.settings import (
    BuildSecret,
    Settings,
    cli_variable_among,
    secret_build_args,
)

Log = Callable[[str], None]
_MANIFEST_URL = re.compile(
    r"//(?P<host>[^/\s\"]+)/v2/(?P<repository>[^\s\"]+?)/manifests/(?P<tag>[^\s\"/]+)"
)
# Where a Docker Hub name is pulled from: such names are written without the host.
_DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io")


@dataclass(frozen=True)
class Target:
    """One build: a stage (None for the final image) and the tag it gets."""

    stage: str | None
    image: ImageRef


@dataclass(frozen=True)
class BuildPlan:
    """What to build, in order; the final image comes last."""

    context: Path
    dockerfile: Path
    targets: tuple[Target, ...]
    unnamed_stages: tuple[int, ...] = ()

    @property
    def images(self) -> tuple[ImageRef, ...]:
        """Every image the plan tags: what the cache keeps and builds reuse."""
        return tuple(target.image for target in self.targets)


@dataclass(frozen=True)
class Builder:
    """How images get built: the classic builder through the API, or BuildKit via a CLI.

    ``exports_cache``: BuildKit here can export its own cache (``--cache-to``): buildx
    on the containerd image store. Then the cache is BuildKit's, not images.
    """

    kind: str
    cli: str = ""
    exports_cache: bool = False


@dataclass(frozen=True)
class CacheExport:
    """BuildKit's own cache for one build: its ``--cache-from`` and ``--cache-to`` values,
    and what the CLI's environment needs for them (a private ``DOCKER_CONFIG``)."""

    cache_from: tuple[str, ...]
    cache_to: str | None
    environ: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuildReport:
    """What a build did, with the cache figures from the builder's own output."""

    builder: Builder
    images: tuple[ImageRef, ...]
    cache_from: tuple[str, ...]
    seconds: float
    tally: StepTally = field(compare=False)
    reuse: str = field(default="", compare=False)
    miss_reasons: tuple[str, ...] = field(default=(), compare=False)
    # Disk the engine got back by removing the images this build replaced (None: unknown).
    bytes_freed: int | None = field(default=0, compare=False)


class CacheExportFailed(BuildFailed):
    """The build itself succeeded, but exporting BuildKit's cache (``--cache-to``) failed."""


def stage_image(image: ImageRef, stage: str) -> ImageRef:
    """The tag a named stage gets, beside the app image: ``app:latest-stage-builder``."""
    tag = f"{image.tag}-stage-{stage}"
    if not is_valid_tag(tag):
        raise ConfigError(
            f"stage {stage!r} of {image} gives the invalid tag {tag!r}",
            hint="name stages with letters, digits, '.', '_' or '-', and keep tags short",
        )
    return image.with_tag(tag)


def plan_build(settings: Settings) -> BuildPlan:
    """Read the Dockerfile and list the stage builds and the final build."""
    image = settings.require_image()
    context = settings.context
    if not context.is_dir():
        raise ConfigError(
            f"build context {context} is not a folder",
            key="LAYERKEEP_CONTEXT",
            hint="set LAYERKEEP_CONTEXT to the folder holding your sources",
        )
    dockerfile = context / settings.dockerfile
    try:
        text = dockerfile.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"cannot read Dockerfile {dockerfile}: {error.strerror}",
            key="LAYERKEEP_DOCKERFILE",
            hint="set LAYERKEEP_DOCKERFILE (relative to LAYERKEEP_CONTEXT)",
        ) from None
    stages = read_stages(text)
    if not stages:
        raise ConfigError(f"{dockerfile} has no FROM line", key="LAYERKEEP_DOCKERFILE")
    earlier = stages[:-1]
    targets = [
        Target(stage.name, stage_image(image, stage.name)) for stage in earlier if stage.name
    ]
    targets.append(Target(None, image))
    unnamed = tuple(stage.index for stage in earlier if not stage.name)
    return BuildPlan(context, dockerfile, tuple(targets), unnamed)


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


def build_image(
    engine: Engine,
    settings: Settings,
    builder: Builder,
    environ: Mapping[str, str],
    *,
    log: Log = print,
    also_cache_from: Sequence[str] = (),
    export: CacheExport | None = None,
) -> BuildReport:
    """Build every stage and then the app image, reusing every cached image present.

    ``also_cache_from`` are more cached images to reuse: those cache.load restored under
    an internal name because the user's own tag named another image. With ``export``
    (a builder that ``exports_cache``), the cache is BuildKit's own instead: one build of
    the app image imports it and exports it again, every stage included (``mode=max``),
    and no stage image is built. layerkeep's own folders inside the context are left
    out of it (see building.context); an image a build replaced is removed once nothing
    tags or uses it.
    """
    plan = plan_build(settings)
    _check_secrets(settings, builder, environ, log)
    if export is not None:
        plan = replace(plan, targets=plan.targets[-1:], unnamed_stages=())
    for index in plan.unnamed_stages:
        log(
            f"warning: stage {index} of {plan.dockerfile.name} has no name, so its layers "
            "cannot be cached on their own; name it with `FROM ... AS <name>`"
        )
    excludes = context_excludes(settings)
    lookup = engine_lookup(engine)
    before = {str(image): lookup(str(image)) for image in plan.images}
    present = [image for image, found in before.items() if found is not None]
    cache_from = (
        export.cache_from
        if export is not None
        else tuple(present + [i for i in also_cache_from if i not in present])
    )
    tally = StepTally()
    reuse = ReuseSource(
        builder.kind, len(cache_from), engine.build_cache_entries(),
        exported=export is not None,
    )
    cli_environ = {**environ, **export.environ} if export is not None else environ
    started = time.monotonic()
    chains: list[list[str]] = []
    for target in plan.targets:
        own = str(target.image)
        sources = list(cache_from) if export is not None else _cache_sources(
            engine, plan, builder, own=own, chains=chains, also=also_cache_from
        )
        log(
            f"building {own} ({builder.kind}"
            + (f", target {target.stage}" if target.stage else "")
            + (
                f", BuildKit's cache from {len(sources)} source(s)"
                if export is not None
                else f", cache from {len(sources)} image(s)"
            )
            + ")"
        )
        job = _Job(
            plan, target, tuple(sources), settings.build_args, excludes, tally, log,
            cache_to=export.cache_to if export is not None else None,
            secrets=settings.build_secrets,
        )
        try:
            if builder.kind == "buildkit":
                _build_with_cli(builder.cli, job, cli_environ)
            else:
                _build_with_api(engine, job)
        except CacheExportFailed:
            raise
        except BuildFailed as error:
            raise _explained(error, engine, plan) from None
        if builder.kind != "buildkit" and target.stage:
            chains.append(_parent_chain(engine, own))
    seconds = time.monotonic() - started
    line = reuse.describe(tally)
    log(f"{line} ({plan.images[-1]} built in {seconds:.1f} s)")
    warning = reuse.warning(tally)
    if warning:
        log(warning)
    reasons = explain_misses(
        engine, settings, dockerfile=plan.dockerfile, builder=builder.kind, excludes=excludes,
        before=before, tally=tally, log=log,
        imported_export=export is not None and bool(export.cache_from),
    )
    replaced = [
        old.id for image, old in before.items() if old and engine.image_id(image) != old.id
    ]
    freed = _remove_replaced(engine, replaced, log) if replaced else 0
    return BuildReport(
        builder, plan.images, cache_from, seconds, tally, line, reasons, bytes_freed=freed
    )


def _cache_sources(
    engine: Engine,
    plan: BuildPlan,
    builder: Builder,
    *,
    own: str,
    chains: list[list[str]],
    also: Sequence[str],
) -> list[str]:
    """The --cache-from list of one target's build (see build_image on the order)."""
    if builder.kind == "buildkit":
        sources = [i for i in map(str, plan.images) if engine.image_id(i) is not None]
    else:
        sources = [*_shortest_first(chains)]
        sources += [own] if engine.image_id(own) is not None else []
    return sources + [i for i in also if i not in sources]


def _explained(error: BuildFailed, engine: Engine, plan: BuildPlan) -> BuildFailed:
    """A build that failed because no registry answers: name the image and the way out."""
    text = "\n".join([error.message, *error.last_lines])
    offline = unreachable_registry(text)
    if offline is None:
        return error
    url = _MANIFEST_URL.search(text)
    if url:
        repository = (
            url["repository"].removeprefix("library/")
            if url["host"] in _DOCKER_HUB_HOSTS
            else f"{url['host']}/{url['repository']}"
        )
        missing = [f"{repository}:{url['tag']}"]
    else:
        stages = read_stages(plan.dockerfile.read_text("utf-8"))
        names = {stage.name for stage in stages}
        bases = dict.fromkeys(stage.base for stage in stages if stage.base not in names)
        missing = [base for base in bases if engine.image_id(base) is None]
    explained = BuildFailed(
        f"build {error.image} failed: cannot pull {', '.join(missing) or 'its base image'} "
        f"({offline})",
        image=error.image,
        last_lines=error.last_lines,
    )
    explained.hint = OFFLINE_HINT
    return explained


def _parent_chain(engine: Engine, image: str) -> list[str]:
    """The ids of ``image`` and its parents, nearest first (the classic builder's chain)."""
    chain: list[str] = []
    attrs = engine.image_attrs(image)
    while attrs is not None:
        chain.append(str(attrs["Id"]))
        parent = str(attrs.get("Parent") or "")
        attrs = engine.image_attrs(parent) if parent else None
    return chain


def _shortest_first(chains: Sequence[Sequence[str]]) -> list[str]:
    """Every id of the chains (each nearest first), shortest history first.

    An id's distance from its chain's root orders it after all of its parents.
    """
    depth: dict[str, int] = {}
    for chain in chains:
        for position, image_id in enumerate(reversed(chain)):
            depth.setdefault(image_id, position)
    return sorted(depth, key=depth.__getitem__)


def _remove_replaced(engine: Engine, replaced: Sequence[str], log: Log) -> int | None:
    """Remove the images this build untagged (the app's and stages' previous ones) that
    nothing else names or uses; the bytes of layers the engine freed, None when the
    engine could not tell (busy with another job's disk-usage query: a figure only)."""
    before = engine.layers_size()
    removed = 0
    for image_id in dict.fromkeys(replaced):
        if _remove_if_unused(engine, image_id):
            removed += 1
            log(f"removed {image_id[:19]}, which this build replaced")
    if not removed:
        return 0
    after = engine.layers_size() if before is not None else None
    if before is None or after is None:
        log(f"{removed} replaced image(s) removed (freed: unknown, the engine was busy)")
        return None
    # Another job's build may add layers meanwhile: never report less than nothing.
    freed = max(before - after, 0)
    log(f"{removed} replaced image(s) removed, {freed / 1e6:.1f} MB freed")
    return freed


def _remove_if_unused(engine: Engine, image_id: str) -> bool:
    """Remove an image a build untagged, unless a tag, a container or a child uses it."""
    attrs = engine.image_attrs(image_id)
    if attrs is None or attrs.get("RepoTags"):
        return False
    try:
        return engine.remove_image(image_id)
    except ResourceConflict:
        return False  # a container or a child image still uses it: the engine keeps it


@dataclass(frozen=True)
class _Job:
    """One target's build: what both builders need."""

    plan: BuildPlan
    target: Target
    cache_from: Sequence[str]
    build_args: Mapping[str, str]
    excludes: tuple[str, ...]
    tally: StepTally
    log: Log
    cache_to: str | None = None
    secrets: Sequence[BuildSecret] = ()


def _check_secrets(
    settings: Settings, builder: Builder, environ: Mapping[str, str], log: Log
) -> None:
    """Stop when the build secrets cannot reach the build; warn of secrets in build args."""
    for name in secret_build_args(settings):
        log(
            f"warning: build arg {name} holds a secret, and a build arg's value stays in "
            "the image's history, so in the cache and the released image; pass it as "
            f"LAYERKEEP_BUILD_SECRETS={name} and read /run/secrets/{name} in "
            f"RUN --mount=type=secret,id={name} instead"
        )
    if not settings.build_secrets:
        return
    if builder.kind != "buildkit":
        raise ConfigError(
            "LAYERKEEP_BUILD_SECRETS is set, but the classic builder has no build secrets",
            key="LAYERKEEP_BUILD_SECRETS",
            hint="build with BuildKit (LAYERKEEP_BUILDER=auto or buildkit, with a docker CLI "
            "that can use it)",
        )
    missing = [s.variable for s in settings.build_secrets if s.variable not in environ]
    if missing:
        raise ConfigError(
            f"LAYERKEEP_BUILD_SECRETS names {', '.join(missing)}, not set in the environment",
            key="LAYERKEEP_BUILD_SECRETS",
            hint="set it in the environment (your CI's secrets), or leave it out",
        )


def _build_with_api(engine: Engine, job: _Job) -> None:
    try:
        _api_build(engine, job, job.cache_from)
    except BuildFailed as error:
        if not job.cache_from or "failed to restore cached image" not in error.message:
            raise
        # dockerd 26.1's classic builder on the containerd image store fails on any
        # cached image it matches; the cache is an optimisation, so build without it.
        job.log(
            f"warning: the classic builder could not use the cached images here "
            f"({error.message.split(': ', 1)[-1][:160]}); building {job.target.image} "
            "without them (LAYERKEEP_BUILDER=auto uses BuildKit, which can)"
        )
        _api_build(engine, job, ())


def _api_build(engine: Engine, job: _Job, cache_from: Sequence[str]) -> None:
    """One classic build through the engine API; its steps count only if it succeeds."""
    steps = StepTally()
    parser = LegacyParser(steps)

    def on_line(line: str) -> None:
        parser.feed(line)
        job.log(line)

    plan = job.plan
    dockerfile = plan.dockerfile
    engine.build(
        plan.context,
        tag=str(job.target.image),
        dockerfile=str(dockerfile.relative_to(plan.context))
        if dockerfile.is_relative_to(plan.context)
        else str(dockerfile),
        target=job.target.stage,
        cache_from=cache_from,
        build_args=job.build_args,
        exclude=job.excludes,
        on_line=on_line,
    )
    parser.finish()
    for key, reused in steps.reused_by_key.items():
        job.tally.record(key, reused)


def _build_with_cli(cli: str, job: _Job, environ: Mapping[str, str]) -> None:
    if not job.excludes:
        _run_cli(cli, job, environ, job.plan.dockerfile)
        return
    with dockerfile_with_excludes(job.plan.dockerfile, job.plan.context, job.excludes) as copy:
        _run_cli(cli, job, environ, copy)


def _run_cli(cli: str, job: _Job, environ: Mapping[str, str], dockerfile: Path) -> None:
    image = str(job.target.image)
    command = [cli, "build", "--progress=plain", "-f", str(dockerfile), "-t", image]
    if job.target.stage:
        command += ["--target", job.target.stage]
    for cached in job.cache_from:
        command += ["--cache-from", cached]
    problem = cli_variable_among(job.build_args)
    if problem:  # settings made by hand (dataclasses.replace) skip the loader's check
        raise ConfigError(problem, key="LAYERKEEP_BUILD_ARGS")
    for secret in job.secrets:
        # The CLI reads the value from its own environment: never on a command line.
        command += ["--secret", f"id={secret.id},env={secret.variable}"]
    build_args = dict(job.build_args)
    if job.cache_to:
        command += ["--cache-to", job.cache_to]
    else:
        build_args["BUILDKIT_INLINE_CACHE"] = "1"
    for name in build_args:
        # Values travel in the environment, not the command line: `--build-arg NAME`
        # takes the value from there, so secrets never show in `ps`.
        command += ["--build-arg", name]
    command.append(str(job.plan.context))
    env = {**environ, **build_args, "DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"}
    parser = BuildkitParser(job.tally)
    tail: deque[str] = deque(maxlen=BuildFailed.TAIL_LINES)
    exporting: set[str] = set()  # the vertices that export BuildKit's cache
    failed_vertex = ""
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as process:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.rstrip("\n")
            tail.append(line)
            parser.feed(line)
            job.log(line)
            vertex, _, text = line.partition(" ")
            if text.startswith("exporting cache"):
                exporting.add(vertex)
            elif text.startswith("ERROR") and not failed_vertex:
                failed_vertex = vertex
    if process.returncode != 0:
        failure = CacheExportFailed if failed_vertex in exporting else BuildFailed
        raise failure.from_output(
            f"build {image}", image=image, exit_code=process.returncode, tail=tail
        )
    parser.finish()


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


def images_to_cache(settings: Settings, *, app: bool = True) -> list[str]:
    """The app image, its stages and the extra images the settings name; only the extra
    ones without ``app`` (a builder that exports BuildKit's cache keeps the app's)."""
    images = [str(image) for image in plan_build(settings).images] if app else []
    return images + [image for image in settings.cache_images if image not in images]


def own_layers_from(engine: Engine, settings: Settings) -> dict[str, int]:
    """Each image of the plan -> the index of its first layer above its base image: the
    layers its build made, which inline cache must cover for the next build to reuse.

    An image whose base the engine lacks or cannot name (``FROM ${BASE}``) is left out.
    """
    plan = plan_build(settings)
    stages = read_stages(plan.dockerfile.read_text("utf-8"))
    by_name = {stage.name: stage for stage in stages if stage.name}
    found: dict[str, int] = {}
    for target in plan.targets:
        stage = by_name.get(target.stage) if target.stage else stages[-1]
        seen: set[str] = set()
        while stage is not None and stage.base.lower() in by_name and stage.base not in seen:
            seen.add(stage.base)
            stage = by_name[stage.base.lower()]
        if stage is None or "$" in stage.base:
            continue
        if stage.base.lower() == "scratch":
            found[str(target.image)] = 0
            continue
        attrs = engine.image_attrs(stage.base)
        if attrs is not None:
            found[str(target.image)] = len(image_layers(attrs))
    return found
