"""Builds hit the restored cache on every engine kind, and caches cross engine versions.

Engine kinds, each a private second engine (``second_engine.py``) so its builder cache
may be pruned: ``legacy-20.10`` and ``buildkit-20.10`` (Debian's dockerd 20.10, classic
builder through the API or BuildKit through the 20.10 CLI), ``26-classic`` and
``26-containerd`` (dockerd 26.1.5 with buildx, classic or containerd image store). The
project is the bundled example; both cache backends (folder, and a real registry).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import SESSION, SESSION_LABEL, TEST_LABEL
from registry_setup import Registry, running_registry
from second_engine import (
    SecondEngine,
    SecondEngineUnavailable,
    ensure_docker26,
    second_engine,
    transfer_images,
)

from layerkeep.build.image import BuildReport, build_image, choose_builder, images_to_cache
from layerkeep.build.oci_cache import containerd_cache_sources
from layerkeep.cache.backend import load_cache, save_cache
from layerkeep.cache.layers import LoadReport
from layerkeep.cache.registry_backend import registry_cache
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, connect
from layerkeep.core.registry import Credentials
from layerkeep.core.settings import Settings, load_settings

pytestmark = pytest.mark.docker

EXAMPLE = Path(__file__).resolve().parent.parent / "example"
BASE = "python:3.11-slim"
KINDS = ("legacy-20.10", "buildkit-20.10", "26-classic", "26-containerd")
BACKENDS = ("dir", "registry")
# Which engine each kind runs on, and the builder it asks for.
ENGINE_OF = {
    # One engine each: the classic builder's chains would count as the other's own cache.
    "legacy-20.10": "20.10-legacy",
    "buildkit-20.10": "20.10-buildkit",
    "26-classic": "26-classic",
    "26-containerd": "26-containerd",
    # Not in KINDS: dockerd 26.1's classic builder cannot use cached images on this store.
    "legacy-26-containerd": "26-containerd",
    # A store that never pulled those images before, whatever ran first.
    "fresh-26-containerd": "26-containerd-fresh",
}
BUILDER_OF = {"legacy-20.10": "legacy", "legacy-26-containerd": "legacy"}


@dataclass
class Cold:
    """A kind's cold build of the example, saved to both backends."""

    kind: str
    image: str
    report: BuildReport
    cache_dir: Path


@dataclass
class Pool:
    """Second engines started on first use and the session's registry; all stop at the end."""

    folder: Path
    main: Engine
    registry: Registry
    stack: contextlib.ExitStack
    engines: dict[str, tuple[SecondEngine, Engine]] = field(default_factory=dict)
    colds: dict[str, Cold] = field(default_factory=dict)
    saved: set[tuple[str, str]] = field(default_factory=set)

    def engine(self, kind: str) -> tuple[SecondEngine, Engine]:
        """The running engine of ``kind``, with the stand-in base image in it."""
        name = ENGINE_OF[kind]
        if name not in self.engines:
            docker26 = None if name.startswith("20.10") else ensure_docker26()
            second = self.stack.enter_context(
                second_engine(
                    self.folder / name,
                    docker26=docker26,
                    containerd_store=name.startswith("26-containerd"),
                )
            )
            transfer_images(os.environ, second.environ, [BASE])
            connected = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            self.stack.callback(connected.close)
            assert connected.uses_containerd_store() == name.startswith("26-containerd")
            self.engines[name] = (second, connected)
        return self.engines[name]

    def settings(
        self,
        kind: str,
        image: str,
        backend: str,
        cache_dir: Path,
        *,
        registry: Registry | None = None,
    ) -> Settings:
        """The example's settings for ``kind``'s engine, through ``load_settings`` (the
        session's registry unless another is given, with its login if it has one)."""
        registry = registry or self.registry
        second, _ = self.engine(kind)
        project = self.folder / "project"
        if not project.exists():
            shutil.copytree(EXAMPLE, project / "example", ignore=shutil.ignore_patterns(".*"))
        environ = {
            **second.environ,
            "LAYERKEEP_PROJECT": f"lk-kinds-{SESSION}",
            "LAYERKEEP_IMAGE": image,
            "LAYERKEEP_CONTEXT": "example",
            "LAYERKEEP_BUILDER": BUILDER_OF.get(kind, "auto"),
            "LAYERKEEP_CACHE_BACKEND": backend,
            "LAYERKEEP_CACHE_DIR": str(cache_dir),
            "LAYERKEEP_REGISTRY": registry.address,
            "LAYERKEEP_REGISTRY_USER": registry.user,
            "LAYERKEEP_REGISTRY_PASSWORD": registry.password,
        }
        return load_settings(project, environ, git_facts=lambda _: GitFacts("", ""))

    def build(
        self, kind: str, settings: Settings, lines: list[str] | None = None
    ) -> BuildReport:
        """Build the example on ``kind``'s engine with the settings' builder; the report
        (its output goes into ``lines`` when given)."""
        second, connected = self.engine(kind)
        builder = choose_builder(settings.builder, second.environ, engine=connected)
        lines = [] if lines is None else lines
        report = build_image(
            connected, settings, builder, second.environ, log=lines.append,
            registry_cache=registry_cache(settings),
        )
        print(f"{kind}: {next(line for line in lines if line.startswith('cache: '))}")
        missed = [step for step, reused in report.tally.reused_by_key.items() if not reused]
        if missed and report.tally.reused:  # shown when a test fails: which and why
            print(f"{kind}: steps not reused: {missed}; reasons: {report.miss_reasons}")
        return report

    def cold(self, kind: str, backend: str) -> Cold:
        """The example built cold once on ``kind``, saved to ``backend`` once."""
        if kind not in self.colds:
            image = f"layerkeep-test/{SESSION}/{kind.replace('.', '')}/shortener"
            cache_dir = self.folder / f"cache-{kind}"
            self.wipe(kind, self.settings(kind, image, "dir", cache_dir))
            report = self.build(kind, self.settings(kind, image, "dir", cache_dir))
            self.colds[kind] = Cold(kind, image, report, cache_dir)
        cold = self.colds[kind]
        if (kind, backend) not in self.saved:
            _, connected = self.engine(kind)
            settings = self.settings(kind, cold.image, backend, cold.cache_dir)
            save_cache(connected, settings, log=print)
            self.saved.add((kind, backend))
        return cold

    def wipe(self, kind: str, settings: Settings) -> None:
        """Remove the app and stage images and everything the engine's builder cached."""
        second, connected = self.engine(kind)
        for image in images_to_cache(settings):
            # By id, with force: the registry backend's cache tags name them too.
            image_id = connected.image_id(image)
            if image_id is not None:
                connected.remove_image(image_id, force=True)
        second.prune_builder()
        assert connected.build_cache_entries() == 0

    def restore(self, kind: str, settings: Settings) -> LoadReport:
        """Load the cache into ``kind``'s engine after wiping it."""
        self.wipe(kind, settings)
        _, connected = self.engine(kind)
        return load_cache(connected, settings, log=print)


@pytest.fixture(scope="session")
def pool(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """Every kind's engine (started when first asked for) and a registry, for the session."""
    folder = tmp_path_factory.mktemp("engine-kinds")
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(running_registry(folder / "registry"))
        yield Pool(folder, engine, registry, stack)


@pytest.fixture(scope="session", params=KINDS)
def kind(request: pytest.FixtureRequest, pool: Pool) -> str:
    """An engine kind whose engine runs (skipped where second engines cannot run)."""
    name = str(request.param)
    try:
        pool.engine(name)
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    return name


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wiped_engine_reuses_every_step_after_restoring(
    pool: Pool, kind: str, backend: str, request: pytest.FixtureRequest
) -> None:
    cold = pool.cold(kind, backend)
    assert cold.report.builder.kind == ("legacy" if kind.startswith("legacy") else "buildkit")
    assert cold.report.tally.reused == 0, cold.report.tally.reused_by_key
    assert cold.report.tally.total >= 9
    assert "no cached image was used" not in cold.report.reuse

    settings = pool.settings(kind, cold.image, backend, cold.cache_dir)
    restored = pool.restore(kind, settings)
    assert len(restored.restored) == 2, restored

    warm = pool.build(kind, settings)
    assert warm.tally.total == cold.report.tally.total
    assert warm.tally.reused == warm.tally.total, warm.tally.reused_by_key
    # The engine had nothing of its own, so the line credits the restored images alone.
    assert "of 2 cached image(s)" in warm.reuse
    assert "own build cache" not in warm.reuse
    if kind == "26-containerd":
        # The registry backend's images are read from the registry it just pulled them
        # from, with no export; the folder's are exported.
        way = "2 from their registry" if backend == "registry" else "2 as OCI exports"
        assert way in warm.reuse


def test_hits_from_the_engines_own_cache_are_not_credited_to_a_restore(
    pool: Pool, kind: str
) -> None:
    cold = pool.cold(kind, "dir")
    settings = pool.settings(kind, cold.image, "dir", cold.cache_dir)
    _, connected = pool.engine(kind)
    pool.build(kind, settings)  # images present and a warm builder cache
    for image in images_to_cache(settings):
        connected.remove_image(image, force=True)
    # Nothing restored: whatever is reused comes from the engine itself.
    again = pool.build(kind, settings)
    assert again.cache_from == ()
    if again.tally.reused:
        assert "from this engine's own build cache: no cached image was used" in again.reuse
    assert "cached image(s)" not in again.reuse


CROSSINGS = [
    ("buildkit-20.10", "26-classic"),
    ("buildkit-20.10", "26-containerd"),
    ("26-classic", "buildkit-20.10"),
    ("26-containerd", "buildkit-20.10"),
    ("26-classic", "26-containerd"),
    ("26-containerd", "26-classic"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("source", "target"), CROSSINGS)
def test_a_cache_saved_on_one_engine_version_restores_on_another(
    pool: Pool,
    source: str,
    target: str,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    try:
        cold = pool.cold(source, backend)
        pool.engine(target)
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    settings = pool.settings(target, cold.image, backend, cold.cache_dir)
    restored = pool.restore(target, settings)
    assert len(restored.restored) == 2, restored
    lines: list[str] = []
    warm = pool.build(target, settings, lines)
    _, connected = pool.engine(target)
    same_buildkit = ENGINE_OF[source].split("-")[0] == ENGINE_OF[target].split("-")[0]
    print(f"{source} -> {target} ({backend}): {warm.reuse}")
    if same_buildkit:
        assert warm.tally.reused == warm.tally.total == cold.report.tally.total
    else:
        # BuildKit 0.8 (20.10) and 0.13 (26) compute different keys for RUN steps, so
        # an inline cache made by one never matches the other's: the build says so.
        assert warm.tally.reused < warm.tally.total
        assert any("another Docker version's BuildKit" in line for line in lines) or (
            warm.tally.reused > 0
        )
        # The build record is found (by image content where the two image stores give
        # the images other ids) and names the two Docker versions as the reason.
        assert any(
            "BuildKit before and since Docker 23" in reason for reason in warm.miss_reasons
        ), warm.miss_reasons
    for image in images_to_cache(settings):
        connected.remove_image(image, force=True)


def test_a_registry_cache_behind_a_login_hits_on_the_containerd_store(
    pool: Pool, tmp_path: Path
) -> None:
    # Images pushed from the classic store pull into the containerd store incomplete
    # (their base layers are there unpacked), so BuildKit reads them from the registry:
    # with layerkeep's login, as the registry refuses anyone else.
    try:
        cold = pool.cold("26-classic", "dir")
        pool.engine("fresh-26-containerd")
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    password = secrets.token_hex(8)
    with running_registry(tmp_path / "registry", user="ci", password=password) as locked:
        _, source = pool.engine("26-classic")
        saving = pool.settings(
            "26-classic", cold.image, "registry", cold.cache_dir, registry=locked
        )
        save_cache(source, saving, log=print)
        settings = pool.settings(
            "fresh-26-containerd", cold.image, "registry", cold.cache_dir, registry=locked
        )
        second, target = pool.engine("fresh-26-containerd")
        config = Path(second.environ["DOCKER_CONFIG"]) / "config.json"
        before = config.read_bytes() if config.exists() else None
        assert len(pool.restore("fresh-26-containerd", settings).restored) == 2
        lines: list[str] = []
        warm = pool.build("fresh-26-containerd", settings, lines)
    assert "2 from their registry" in warm.reuse
    assert warm.tally.reused == warm.tally.total == cold.report.tally.total, lines
    assert not any(password in line for line in lines)
    # The user's own docker config is left as it was.
    assert (config.read_bytes() if config.exists() else None) == before
    for image in images_to_cache(settings):
        target.remove_image(image, force=True)


def test_the_classic_builder_on_the_containerd_store_builds_without_a_cache_it_cannot_use(
    pool: Pool,
) -> None:
    kind = "legacy-26-containerd"
    try:
        cold = pool.cold(kind, "dir")
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    settings = pool.settings(kind, cold.image, "dir", cold.cache_dir)
    assert len(pool.restore(kind, settings).restored) == 2
    _, connected = pool.engine(kind)
    lines: list[str] = []
    # dockerd 26.1 fails such a build ("failed to restore cached image"); layerkeep
    # says so and builds again without the cache.
    warm = pool.build(kind, settings, lines)
    assert warm.builder.kind == "legacy"
    assert any("the classic builder could not use the cached images" in line for line in lines)
    assert warm.tally.total == cold.report.tally.total
    for image in images_to_cache(settings):
        assert connected.image_id(image) is not None
        connected.remove_image(image, force=True)


def test_an_image_the_engine_cannot_export_is_left_out_and_the_others_serve(
    pool: Pool,
) -> None:
    try:
        second, connected = pool.engine("26-containerd")
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    absent = f"layerkeep-test/{SESSION}/never-built:latest"
    lines: list[str] = []
    with contextlib.ExitStack() as stack:
        # The engine refuses the one `docker save` of both: each is then saved alone.
        # BASE has "repo digests" (every tag does, on this store) but none in the
        # registry cache, so it is exported, not read from a registry.
        found = containerd_cache_sources(
            connected, [absent, BASE], stack, environ=second.environ, log=lines.append,
            credentials_for=Credentials,
            cache_repository=f"{pool.registry.address}/never-pushed-cache",
        )
        assert len(found.local) == 1
        assert found.registry == []
        layout = Path(found.local[0].split("src=", 1)[1].split(",", 1)[0])
        index = json.loads((layout / "index.json").read_text())
        assert len(index["manifests"]) == 1
        assert (layout / "oci-layout").is_file()
    assert any(line.startswith(f"warning: {absent} not exported") for line in lines), lines
    assert any(f"{absent} is left out of the build's cache" in line for line in lines)
    assert (connected.image_attrs(BASE) or {}).get("RepoDigests")
    assert not any(BASE in line for line in lines), lines


def test_each_kind_builds_with_the_builder_it_should(pool: Pool, kind: str) -> None:
    second, connected = pool.engine(kind)
    chosen = choose_builder(BUILDER_OF.get(kind, "auto"), second.environ, engine=connected)
    if kind.startswith("legacy"):
        assert chosen.kind == "legacy"
    elif kind.startswith("26"):
        # buildx from the private DOCKER_CONFIG, with the 26 CLI.
        assert chosen.kind == "buildkit"
        assert chosen.cli.startswith(str(ensure_docker26().prefix))
    else:
        assert chosen.kind == "buildkit"
