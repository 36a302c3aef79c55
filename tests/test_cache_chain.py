"""The cache hits on every commit: a chain of fresh machines, on every engine kind.

A CI fleet is a chain: each job runs on a fresh machine that restores what the job
before saved, and nearly every commit edits code. Each chain here is four hops of
`inv cache.save` (git.touch, cache.load, image.build, cache.save) on a fresh machine,
with an edit committed before hops 1 and 2 and none before hop 3. Before each hop, the
machine of the hop before builds the new commit warm (its own images and build cache,
the cache read-only): what a warm rebuild on one machine reuses is what the fresh
machine must reuse, step for step.

A fresh machine is a throw-away engine (``second_engine.py``) with every image but the
base removed and its builder cache emptied. Engine kinds: Docker 20.10 with BuildKit
and with the classic builder, Docker 26 on the classic image store with buildx and
with the classic builder, Docker 26 on the containerd image store with buildx. Cache
backends: the folder, and a real registry. Dockerfile shapes: an edit in the final
stage under a dependency stage; a builder stage whose ``COPY .`` follows RUN steps, and
a final stage that bind-mounts it and copies from it (the shape that lost every step
on the second fresh Docker 26 machine); a single stage.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from clean_env import clean_environ
from registry_setup import Registry, running_registry
from second_engine import (
    SecondEngine,
    SecondEngineUnavailable,
    ensure_docker26,
    second_engine,
    transfer_images,
)

pytestmark = [pytest.mark.docker, pytest.mark.private_engines]

BASE = "debian:bookworm-slim"
HOPS = ("cold", "edit", "edit", "same")
# kind -> (engine, LAYERKEEP_BUILDER)
KINDS = {
    "20.10-buildkit": ("20.10", "buildkit"),
    "20.10-classic-builder": ("20.10", "legacy"),
    "26-classic-store": ("26", "buildkit"),
    "26-classic-builder": ("26", "legacy"),
    "26-containerd-store": ("26-containerd", "buildkit"),
}
ENGINES = {
    "20.10": {"docker26": False, "containerd_store": False},
    "26": {"docker26": True, "containerd_store": False},
    "26-containerd": {"docker26": True, "containerd_store": True},
}

FINAL_EDIT = """\
FROM debian:bookworm-slim AS deps
RUN echo tools > /tools.txt
COPY requirements.txt /requirements.txt
RUN cat /requirements.txt > /installed.txt

FROM debian:bookworm-slim
RUN echo user > /user.txt
COPY --from=deps /installed.txt /opt/installed.txt
WORKDIR /app
COPY config/ ./config/
COPY src/ ./src/
RUN cat src/*.txt > /app/all.txt
"""
# The classic builder has no RUN --mount: there the final stage copies only.
BUILDER_COPY_ALL = """\
FROM debian:bookworm-slim AS builder
RUN echo compiler > /compiler.txt
RUN echo libraries > /libraries.txt
WORKDIR /work
COPY . .
RUN cat src/*.txt > /built.txt

FROM debian:bookworm-slim
RUN echo runtime > /runtime.txt
{mount}COPY --from=builder /built.txt /app/built.txt
"""
MOUNT = (
    "RUN --mount=type=bind,from=builder,source=/built.txt,target=/mnt/built "
    "cp /mnt/built /app.txt\n"
)
SINGLE = """\
FROM debian:bookworm-slim
RUN echo one > /one.txt
RUN echo two > /two.txt
COPY config/ /config/
RUN cat /config/* > /config.txt
COPY src/ /src/
RUN cat /src/* > /src.txt
"""
SHAPES = ("final-edit", "builder-copy-all", "single")


def dockerfile(shape: str, builder: str) -> str:
    """The shape's Dockerfile for ``builder``."""
    if shape == "final-edit":
        return FINAL_EDIT
    if shape == "builder-copy-all":
        return BUILDER_COPY_ALL.format(mount="" if builder == "legacy" else MOUNT)
    return SINGLE


@dataclass
class Engines:
    """The throw-away engines, started on first use, each with only the base image."""

    folder: Path
    stack: contextlib.ExitStack
    running: dict[str, SecondEngine] = field(default_factory=dict)

    def get(self, name: str) -> SecondEngine:
        if name not in self.running:
            options = ENGINES[name]
            try:
                engine = self.stack.enter_context(
                    second_engine(
                        self.folder / name,
                        docker26=ensure_docker26() if options["docker26"] else None,
                        containerd_store=bool(options["containerd_store"]),
                    )
                )
            except SecondEngineUnavailable as error:
                pytest.skip(f"no throw-away engine here: {error}")
            transfer_images(os.environ, engine.environ, [BASE])
            self.running[name] = engine
        return self.running[name]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    with contextlib.ExitStack() as stack:
        yield Engines(tmp_path_factory.mktemp("chain-engines"), stack)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("chain-registry")) as running:
        yield running


@dataclass(frozen=True)
class Reuse:
    """What one build reused, from the run report."""

    reused: int
    total: int
    line: str

    def __str__(self) -> str:
        return f"{self.reused}/{self.total}"


class Project:
    """A git project of one shape, built with `inv` on one engine."""

    def __init__(self, root: Path, chain: Chain, engine: SecondEngine, registry: Registry) -> None:
        shape, builder, backend = chain.shape, KINDS[chain.kind][1], chain.backend
        self.root = root
        self.engine = engine
        self.image = f"lk-chain-{secrets.token_hex(4)}/app"
        (root / "config").mkdir(parents=True)
        (root / "src").mkdir()
        (root / "Dockerfile").write_text(dockerfile(shape, builder))
        (root / "requirements.txt").write_text("flask==3.0\n")
        (root / "config" / "app.conf").write_text("port = 8000\n")
        (root / "src" / "main.txt").write_text("print('hello')\n")
        (root / ".dockerignore").write_text(".git\nlayerkeep.env\ntasks.py\n")
        (root / "tasks.py").write_text("from layerkeep.tasks import ns\n")
        (root / "layerkeep.env").write_text(
            "\n".join(
                [
                    f"LAYERKEEP_PROJECT=chain-{secrets.token_hex(3)}",
                    f"LAYERKEEP_IMAGE={self.image}",
                    f"LAYERKEEP_BUILDER={builder}",
                    f"LAYERKEEP_CACHE_BACKEND={backend}",
                    "LAYERKEEP_CACHE_DIR=cache",
                    "LAYERKEEP_REPORTS_DIR=reports",
                    f"LAYERKEEP_REGISTRY={registry.address}",
                    "LAYERKEEP_BRANCH=main",
                ]
            )
            + "\n"
        )
        self.git("init", "-q", "-b", "main")
        self.commit("first")

    def git(self, *arguments: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=chain", "-c", "user.email=chain@example.com", *arguments],
            cwd=self.root, check=True, capture_output=True,
        )

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def edit(self, hop: int) -> None:
        with (self.root / "src" / "main.txt").open("a") as source:
            source.write(f"# edit before hop {hop}\n")
        self.commit(f"edit {hop}")

    def inv(self, *tasks: str, **extra: str) -> Reuse:
        """Run `inv` on this project's engine; the image.build row of its report."""
        environ = clean_environ(
            DOCKER_HOST=self.engine.environ["DOCKER_HOST"],
            DOCKER_CONFIG=self.engine.environ["DOCKER_CONFIG"],
            PATH=self.engine.environ["PATH"],
            **extra,
        )
        run = subprocess.run(
            ["inv", *tasks], cwd=self.root, env=environ, capture_output=True, text=True,
            check=False, timeout=600,
        )
        output = run.stdout + run.stderr
        assert run.returncode == 0, output[-4000:]
        report = json.loads((self.root / "reports" / "layerkeep-report.json").read_text())
        build = next(task for task in report["tasks"] if task["name"] == "image.build")
        figures = build["figures"]
        assert build["result"] == "ok", output[-4000:]
        for task in report["tasks"]:  # no cache failure may hide behind a warning here
            assert task["result"] in ("ok", "skipped"), (task, output[-4000:])
        assert "inline cache covers no step" not in output, output[-4000:]
        return Reuse(int(figures["steps_reused"]), int(figures["steps_total"]), output)

    def warm_rebuild(self) -> Reuse:
        """The new commit built on the machine that built the one before: no fresh
        machine, no cache written."""
        return self.inv(
            "image.build", LAYERKEEP_SKIP_DEPENDENCIES="yes", LAYERKEEP_CACHE_READ_ONLY="yes"
        )

    def fresh_machine(self) -> None:
        """Everything but the base image removed; the builder cache emptied."""
        env = dict(self.engine.environ)
        docker = [shutil.which("docker", path=env["PATH"]) or "docker"]
        listed = subprocess.run(
            [*docker, "image", "ls", "-a", "--format", "{{.Repository}}:{{.Tag}} {{.ID}}"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.split("\n")
        kept = {BASE}
        doomed = [line.split()[1] for line in listed if line and line.split()[0] not in kept]
        if doomed:
            subprocess.run(
                [*docker, "rmi", "-f", *set(doomed)], env=env, capture_output=True, check=False
            )
        self.engine.prune_builder()
        left = subprocess.run(
            [*docker, "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.split()
        assert left == [BASE], left


@dataclass(frozen=True)
class Chain:
    """One chain: an engine kind, a cache backend, a Dockerfile shape."""

    kind: str
    backend: str
    shape: str

    def __str__(self) -> str:
        return f"{self.kind}-{self.backend}-{self.shape}"


CHAINS = [
    *(Chain(kind, "dir", shape) for kind in KINDS for shape in SHAPES),
    *(Chain(kind, "registry", "builder-copy-all") for kind in KINDS),
]


@pytest.mark.parametrize("chain", CHAINS, ids=str)
def test_every_hop_of_a_chain_of_fresh_machines_reuses_what_a_warm_rebuild_does(
    engines: Engines, registry: Registry, tmp_path: Path, chain: Chain
) -> None:
    engine = engines.get(KINDS[chain.kind][0])
    project = Project(tmp_path / "project", chain, engine, registry)
    seen: list[str] = []
    for hop, change in enumerate(HOPS):
        if change == "edit":
            project.edit(hop)
        warm = project.warm_rebuild() if hop else None
        project.fresh_machine()
        fresh = project.inv("cache.save")
        seen.append(f"hop {hop} ({change}): fresh {fresh}, warm {warm}")
        if warm is None:
            assert fresh.reused == 0, seen
            continue
        assert (fresh.reused, fresh.total) == (warm.reused, warm.total), (
            "\n".join(seen) + "\n" + fresh.line[-3000:]
        )
        if change == "same":
            assert fresh.reused == fresh.total, seen
        else:
            assert 0 < fresh.reused < fresh.total, seen
