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

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from layerkeep.building.build_plan import BuildPlan, plan_build
from layerkeep.building.builder import Builder
from layerkeep.building.context import context_excludes
from layerkeep.building.dockerfile import read_stages
from layerkeep.building.explain import explain_misses
from layerkeep.building.output import ReuseSource, StepTally
from layerkeep.building.replaced_images import remove_replaced
from layerkeep.building.step_inputs import engine_lookup
from layerkeep.building.target_build import CacheExportFailed, Job, build_target
from layerkeep.core.engine import Engine
from layerkeep.core.errors import BuildFailed, ConfigError
from layerkeep.core.imageref import ImageRef
from layerkeep.core.log import Log
from layerkeep.core.registry_failures import OFFLINE_HINT, unreachable_registry
from layerkeep.core.settings import Settings, secret_build_args

_MANIFEST_URL = re.compile(
    r"//(?P<host>[^/\s\"]+)/v2/(?P<repository>[^\s\"]+?)/manifests/(?P<tag>[^\s\"/]+)"
)
# Where a Docker Hub name is pulled from: such names are written without the host.
_DOCKER_HUB_HOSTS = ("registry-1.docker.io", "index.docker.io", "docker.io")


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
        job = Job(
            plan, target, tuple(sources), settings.build_args, excludes, tally, log,
            cache_to=export.cache_to if export is not None else None,
            secrets=settings.build_secrets,
            compression=settings.layer_compression if export is not None else "",
            inline_cache=export is None,
        )
        try:
            build_target(engine, builder, job, cli_environ)
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
    freed = remove_replaced(engine, replaced, log) if replaced else 0
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


def unset_secret_variables(settings: Settings, environ: Mapping[str, str]) -> list[str]:
    """The variables LAYERKEEP_BUILD_SECRETS names that ``environ`` lacks."""
    return [s.variable for s in settings.build_secrets if s.variable not in environ]


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
    missing = unset_secret_variables(settings, environ)
    if missing:
        raise ConfigError(
            f"LAYERKEEP_BUILD_SECRETS names {', '.join(missing)}, not set in the environment",
            key="LAYERKEEP_BUILD_SECRETS",
            hint="set it in the environment (your CI's secrets), or leave it out",
        )

