"""One target's build: the classic builder through the engine API, or BuildKit through
the docker CLI, counting the steps each reused from its own output."""

from __future__ import annotations

import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from layerkeep.building.build_plan import BuildPlan, Target
from layerkeep.building.builder import Builder
from layerkeep.building.context import dockerfile_with_excludes
from layerkeep.building.output import BuildkitParser, LegacyParser, StepTally
from layerkeep.core.engine import Engine
from layerkeep.core.errors import BuildFailed, ConfigError
from layerkeep.core.log import Log
from layerkeep.core.settings import BuildSecret, cli_variable_among


class CacheExportFailed(BuildFailed):
    """The build itself succeeded, but exporting BuildKit's cache (``--cache-to``) failed."""


@dataclass(frozen=True)
class Job:
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
    # "zstd": the image's and the exported cache's layers (see _output_flags); anything
    # else leaves BuildKit's default, gzip.
    compression: str = ""
    # Inline cache metadata in the image (BuildKit), for the next build's --cache-from;
    # not where the cache is BuildKit's own export.
    inline_cache: bool = True


def build_target(
    engine: Engine, builder: Builder, job: Job, environ: Mapping[str, str]
) -> None:
    """Build ``job`` with ``builder``, counting its steps in ``job.tally``.

    ``environ`` is the docker CLI's (BuildKit); a failure raises BuildFailed, and
    CacheExportFailed when only the export of BuildKit's cache failed.
    """
    if builder.kind == "buildkit":
        _build_with_cli(builder.cli, job, environ)
    else:
        _build_with_api(engine, job)


def _build_with_api(engine: Engine, job: Job) -> None:
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


def _api_build(engine: Engine, job: Job, cache_from: Sequence[str]) -> None:
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


def _build_with_cli(cli: str, job: Job, environ: Mapping[str, str]) -> None:
    if not job.excludes:
        _run_cli(cli, job, environ, job.plan.dockerfile)
        return
    with dockerfile_with_excludes(job.plan.dockerfile, job.plan.context, job.excludes) as copy:
        _run_cli(cli, job, environ, copy)


def _output_flags(job: Job) -> list[str]:
    """Where the image goes: tagged in the engine; with zstd layers when asked.

    The engine unpacks zstd layers several times faster than gzip ones, and BuildKit
    compresses them faster: on the containerd image store, where the image's layers come
    from the imported cache, that is most of a cached build's time.
    """
    image = str(job.target.image)
    if job.compression != "zstd":
        return ["-t", image]
    return ["--output", f"type=image,name={image}{_compression_options(job.compression)}"]


def _compression_options(compression: str) -> str:
    """The exporter options for ``compression`` ("" leaves BuildKit's default, gzip)."""
    return ",compression=zstd,oci-mediatypes=true" if compression == "zstd" else ""


def _run_cli(cli: str, job: Job, environ: Mapping[str, str], dockerfile: Path) -> None:
    image = str(job.target.image)
    command = [cli, "build", "--progress=plain", "-f", str(dockerfile), *_output_flags(job)]
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
        command += ["--cache-to", job.cache_to + _compression_options(job.compression)]
    elif job.inline_cache:
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
