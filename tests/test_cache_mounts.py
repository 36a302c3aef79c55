"""BuildKit cache mounts kept across machines (LAYERKEEP_CACHE_MOUNTS).

The Dockerfile parsing and the cache folder's index are tested without an engine. The
round trip runs on private throw-away engines (tests/second_engine.py), because only a
global ``docker builder prune`` empties BuildKit's cache mounts: 20.10 with BuildKit
through its CLI, 26.1.5 with buildx on the classic and on the containerd image store,
each with the folder and the registry backend.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from conftest import SESSION_LABEL, TEST_LABEL
from registry_setup import Registry, running_registry
from second_engine import (
    SecondEngine,
    SecondEngineUnavailable,
    ensure_docker26,
    second_engine,
    transfer_images,
)

from layerkeep.building.build_plan import plan_build
from layerkeep.building.builder import Builder, choose_builder
from layerkeep.building.cache_mounts import CacheMount, find_cache_mounts
from layerkeep.building.image import build_image
from layerkeep.cache.mount_folder import MountStore
from layerkeep.cache.mount_store import (
    cache_mounts,
    describe_mounts,
    restore_cache_mounts,
    save_cache_mounts,
)
from layerkeep.cache.store_errors import CorruptCache
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, connect
from layerkeep.core.errors import ConfigError
from layerkeep.core.settings import Settings, load_settings

BASE = "python:3.11-slim"


def settings_for(project: Path, environ: Mapping[str, str]) -> Settings:
    return load_settings(project, environ, git_facts=lambda _: GitFacts("", ""))


# ---- finding the cache mounts ----------------------------------------------------------

MULTI_STAGE = """\
ARG PYTHON=3.11
FROM python:${PYTHON}-slim AS deps
RUN --mount=type=cache,target=/root/.cache/pip \\
    --mount=type=bind,source=requirements.txt,target=/r.txt pip install -r /r.txt
FROM deps AS build
RUN --network=none --mount=type=cache,id=apt,dst=/var/cache/apt,sharing=locked,uid=1000,mode=0750 \\
    true
RUN --mount=type=cache,target=/root/.cache/pip pip wheel .
RUN --mount=type=cache,from=deps,source=/x,target=/x true
RUN --mount=type=cache,target=$HOME/.npm true
FROM scratch
RUN --mount=type=cache,target=/y true
"""


def test_cache_mounts_are_found_per_stage_once_per_cache() -> None:
    found = find_cache_mounts(MULTI_STAGE, {})
    assert found.mounts == (
        CacheMount("/root/.cache/pip", "/root/.cache/pip", "python:3.11-slim"),
        CacheMount(
            "apt", "/var/cache/apt", "python:3.11-slim", "locked", ("uid=1000", "mode=0750")
        ),
    )
    assert found.mounts[1].spec("/c") == (
        "type=cache,id=apt,target=/c,sharing=locked,uid=1000,mode=0750"
    )
    assert [note.split(":")[0] for note in found.notes] == [
        "cache mount /x (stage build) is seeded from deps",
        "cache mount $HOME/.npm (stage build)",
        "cache mount /y (stage 2)",
    ]


def test_a_build_arg_names_the_base_the_generated_builds_use() -> None:
    found = find_cache_mounts(MULTI_STAGE, {"PYTHON": "3.12"})
    assert {mount.base for mount in found.mounts} == {"python:3.12-slim"}
    unknown = find_cache_mounts("FROM $IMAGE\nRUN --mount=type=cache,target=/c true\n", {})
    assert unknown.mounts == ()
    assert "unknown image" in unknown.notes[0]


def test_global_args_are_read_as_the_builder_reads_them() -> None:
    # Quotes are not part of a default, one ARG may declare several names, and a name
    # without a default gives no base.
    text = (
        'ARG REGISTRY="docker.io/library" PYTHON=3.11 TAG\n'
        "FROM ${REGISTRY}/python:${PYTHON}-slim\n"
        "RUN --mount=type=cache,target=/c true\n"
        "FROM python:${TAG}\n"
        "RUN --mount=type=cache,target=/d true\n"
    )
    found = find_cache_mounts(text, {})
    assert [(m.id, m.base) for m in found.mounts] == [("/c", "docker.io/library/python:3.11-slim")]
    assert [note.split(":")[0] for note in found.notes] == ["cache mount /d (stage 1)"]


def test_the_classic_builder_and_the_opt_out_keep_nothing(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(MULTI_STAGE)
    settings = settings_for(tmp_path, {"LAYERKEEP_IMAGE": "app"})
    lines: list[str] = []
    assert cache_mounts(settings, Builder("legacy"), log=lines.append) == []
    assert lines == [
        "cache mounts: the classic builder has none (it ignores RUN --mount), so 2 cache "
        "mount(s) are not kept; build with BuildKit to keep them"
    ]
    assert len(cache_mounts(settings, Builder("buildkit", "docker"), log=lines.append)) == 2
    off = settings_for(tmp_path, {"LAYERKEEP_IMAGE": "app", "LAYERKEEP_CACHE_MOUNTS": "no"})
    assert cache_mounts(off, Builder("buildkit", "docker"), log=lines.append) == []


def test_the_size_limit_is_a_size(tmp_path: Path) -> None:
    environ = {"LAYERKEEP_CACHE_MOUNTS_MAX": "1.5GiB"}
    assert settings_for(tmp_path, environ).cache_mounts_max == int(1.5 * 2**30)
    with pytest.raises(ConfigError, match="LAYERKEEP_CACHE_MOUNTS_MAX='lots'") as raised:
        settings_for(tmp_path, {"LAYERKEEP_CACHE_MOUNTS_MAX": "lots"})
    assert raised.value.hint == "write a size such as 500MB or 2GB"


# ---- the cache folder ------------------------------------------------------------------


def tar_of(folder: Path, name: str, size: int) -> tuple[Path, str, int]:
    """A file standing for an exported mount, with its digest and size."""
    path = folder / name
    path.write_bytes(os.urandom(size))
    return path, f"sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}", size


def test_the_store_skips_unchanged_contents_and_drops_the_least_recently_saved(
    tmp_path: Path,
) -> None:
    store = MountStore(tmp_path / "cache")
    pip, npm, apt = (CacheMount(name, f"/{name}", BASE) for name in ("pip", "npm", "apt"))
    first = tar_of(tmp_path, "a", 4000)
    assert store.keep(pip, *first, level=3)
    assert not store.keep(pip, *first, level=3)  # same digest: not written again
    assert store.keep(npm, *tar_of(tmp_path, "b", 3000), level=3)
    assert store.keep(pip, *tar_of(tmp_path, "c", 4500), level=3)  # changed: written
    assert store.keep(apt, *tar_of(tmp_path, "d", 2000), level=3)
    # Saved most recently: apt, then pip; npm is the oldest and goes first.
    assert store.evict(7000) == ["npm"]
    assert set(store.read_index()) == {"pip", "apt"}
    assert sorted(path.name for path in store.folder.iterdir()) == sorted(
        [kept.file for kept in store.read_index().values()] + ["index.json"]
    )
    restored = tmp_path / "restored.tar"
    assert store.unpack(pip, restored) == 4500
    assert restored.read_bytes() == (tmp_path / "c").read_bytes()
    assert store.unpack(npm, restored) is None


def test_a_damaged_archive_is_reported_and_forgotten(tmp_path: Path) -> None:
    store = MountStore(tmp_path / "cache")
    pip = CacheMount("pip", "/pip", BASE)
    store.keep(pip, *tar_of(tmp_path, "a", 100_000), level=3)
    archive = store.folder / store.read_index()["pip"].file
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(CorruptCache, match="is damaged"):
        store.unpack(pip, tmp_path / "out.tar")
    assert store.read_index() == {}


# ---- real engines ----------------------------------------------------------------------

KINDS = ("buildkit-20.10", "26-classic", "26-containerd")
# The RUN step reports what the mount held, and leaves its own marker for the next run.
DOCKERFILE = """\
FROM {base}
ARG TOKEN
RUN --mount=type=cache,id={cache_id},target=/root/.cache/marker,uid=1000,mode=0750 \\
    echo "found $(cat /root/.cache/marker/token 2>/dev/null || echo nothing)" \\
    "owner $(stat -c %u:%a /root/.cache/marker)" \\
    && echo "$TOKEN" > /root/.cache/marker/token && echo "wrote $TOKEN"
"""


class Engines:
    """One private engine per kind, started on first use, all stopped at the end."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        self.folder = folder
        self.stack = stack
        self.running: dict[str, tuple[SecondEngine, Engine]] = {}

    def get(self, kind: str) -> tuple[SecondEngine, Engine]:
        if kind not in self.running:
            docker26 = ensure_docker26() if kind.startswith("26") else None
            second = self.stack.enter_context(
                second_engine(
                    self.folder / kind, docker26=docker26,
                    containerd_store=kind == "26-containerd",
                )
            )
            transfer_images(os.environ, second.environ, [BASE])
            engine = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            self.stack.callback(engine.close)
            self.running[kind] = (second, engine)
        return self.running[kind]


@pytest.fixture(scope="module")
def engines(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    """Private engines; ``engine`` is the main one, holding the stand-in base image."""
    with contextlib.ExitStack() as stack:
        yield Engines(tmp_path_factory.mktemp("mount-engines"), stack)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with running_registry(tmp_path_factory.mktemp("mount-registry")) as running:
        yield running


def wipe(second: SecondEngine, engine: Engine, settings: Settings) -> None:
    """A fresh machine: no app image, no cache tag, nothing in the builder's cache."""
    for image in engine.local_images():
        if any(str(tag).startswith(("layerkeep-test", "127.0.0.1")) for tag in
               image.get("RepoTags") or []):
            engine.remove_image(str(image["Id"]), force=True)
    for app in plan_build(settings).images:
        assert engine.image_id(str(app)) is None
    second.prune_builder()
    assert engine.build_cache_entries() == 0


def build(second: SecondEngine, engine: Engine, settings: Settings, token: str) -> list[str]:
    """Build the project with TOKEN; the lines the RUN step printed about the mount."""
    builder = choose_builder("buildkit", second.environ, engine=engine)
    lines: list[str] = []
    environ = {**second.environ, "TOKEN": token}
    with_token = settings.with_flags(build_args=f"TOKEN={token}")
    build_image(engine, with_token, builder, environ, log=lines.append)
    return [line for line in lines if "found " in line and "owner" in line and "echo" not in line]


@pytest.mark.docker
@pytest.mark.parametrize("backend", ["dir", "registry"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_marker_in_a_cache_mount_is_there_after_the_engine_is_wiped(
    engines: Engines, registry: Registry, tmp_path: Path, kind: str, backend: str
) -> None:
    try:
        second, engine = engines.get(kind)
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    cache_id = f"lk-test-{uuid.uuid4().hex[:10]}"
    project = tmp_path / "project"
    project.mkdir()
    (project / "Dockerfile").write_text(DOCKERFILE.format(base=BASE, cache_id=cache_id))
    settings = settings_for(project, {
        **second.environ,
        "LAYERKEEP_IMAGE": f"layerkeep-test/mounts-{uuid.uuid4().hex[:8]}/app",
        "LAYERKEEP_BUILDER": "buildkit",
        "LAYERKEEP_CACHE_BACKEND": backend,
        "LAYERKEEP_CACHE_DIR": str(tmp_path / "cache"),
        "LAYERKEEP_REGISTRY": registry.address,
    })
    builder = choose_builder("buildkit", second.environ, engine=engine)
    assert builder.kind == "buildkit"

    first = restore_cache_mounts(engine, settings, builder, second.environ, log=print)
    assert first.missing == [cache_id]
    (line,) = build(second, engine, settings, "run-1")
    assert "found nothing owner 1000:750" in line
    saved = save_cache_mounts(engine, settings, builder, second.environ, log=print)
    assert saved.saved == [cache_id], saved
    again = save_cache_mounts(engine, settings, builder, second.environ, log=print)
    assert again.unchanged == [cache_id]
    assert again.saved == []

    wipe(second, engine, settings)
    restored = restore_cache_mounts(engine, settings, builder, second.environ, log=print)
    assert restored.restored == [cache_id], restored
    assert describe_mounts(restored).startswith("cache mounts: 1 restored (")
    lines = build(second, engine, settings, "run-2")
    assert len(lines) == 1, lines
    # The marker run 1 wrote, with the mount's owner and mode from its uid/mode options.
    assert "found run-1 owner 1000:750" in lines[0]

    # Restoring into a mount the builder still holds leaves it as it is.
    kept = restore_cache_mounts(engine, settings, builder, second.environ, log=print)
    assert kept.kept == [cache_id]


@pytest.mark.docker
def test_without_the_restore_a_wiped_engine_finds_nothing(
    engines: Engines, tmp_path: Path
) -> None:
    try:
        second, engine = engines.get("buildkit-20.10")
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    project = tmp_path / "project"
    project.mkdir()
    cache_id = f"lk-test-{uuid.uuid4().hex[:10]}"
    (project / "Dockerfile").write_text(DOCKERFILE.format(base=BASE, cache_id=cache_id))
    environ = {
        **second.environ,
        "LAYERKEEP_IMAGE": f"layerkeep-test/mounts-{uuid.uuid4().hex[:8]}/app",
        "LAYERKEEP_CACHE_DIR": str(tmp_path / "cache"),
        "LAYERKEEP_CACHE_MOUNTS": "no",
    }
    settings = settings_for(project, environ)
    builder = choose_builder("buildkit", second.environ, engine=engine)
    (line,) = build(second, engine, settings, "run-1")
    assert "found nothing" in line
    saved = save_cache_mounts(engine, settings, builder, second.environ, log=print)
    assert saved.skipped
    assert not (tmp_path / "cache" / "mounts").exists()
    wipe(second, engine, settings)
    restore_cache_mounts(engine, settings, builder, second.environ, log=print)
    (line,) = build(second, engine, settings, "run-2")
    assert "found nothing" in line


@pytest.mark.docker
def test_a_new_branch_restores_the_fallback_branchs_mounts_and_a_read_only_build_saves_none(
    engines: Engines, registry: Registry, tmp_path: Path
) -> None:
    try:
        second, engine = engines.get("buildkit-20.10")
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    cache_id = f"lk-test-{uuid.uuid4().hex[:10]}"
    project = tmp_path / "project"
    project.mkdir()
    (project / "Dockerfile").write_text(DOCKERFILE.format(base=BASE, cache_id=cache_id))
    repository = f"layerkeep-test/mounts-{uuid.uuid4().hex[:8]}/app"
    environ = {
        **second.environ,
        "LAYERKEEP_IMAGE": repository,
        "LAYERKEEP_CACHE_BACKEND": "registry",
        "LAYERKEEP_REGISTRY": registry.address,
        "LAYERKEEP_CACHE_FALLBACK_BRANCH": "main",
        "LAYERKEEP_BRANCH": "main",
    }
    main = settings_for(project, environ)
    builder = choose_builder("buildkit", second.environ, engine=engine)
    build(second, engine, main, "on-main")
    assert save_cache_mounts(engine, main, builder, second.environ, log=print).saved

    feature = settings_for(project, {
        **environ, "LAYERKEEP_BRANCH": "feature/x", "LAYERKEEP_CACHE_READ_ONLY": "yes",
    })
    wipe(second, engine, feature)
    assert restore_cache_mounts(engine, feature, builder, second.environ, log=print).restored
    (line,) = build(second, engine, feature, "on-feature")
    assert "found on-main" in line
    saved = save_cache_mounts(engine, feature, builder, second.environ, log=print)
    assert saved.skipped.startswith("not saved, the registry cache is read-only")
    _, tags, _ = registry.get(f"/v2/{repository}-cache/tags/list")
    assert [tag for tag in tags["tags"] if "-mount-" in tag] == [
        next(tag for tag in tags["tags"] if tag.startswith("main--"))
    ]
