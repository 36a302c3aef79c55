"""Builds hit the restored cache on every engine kind, and what crosses engine kinds.

Engine kinds, each a private second engine (``second_engine.py``) so its builder cache
may be pruned: ``legacy-20.10`` and ``buildkit-20.10`` (Debian's dockerd 20.10, classic
builder through the API or BuildKit through the 20.10 CLI), ``26-classic`` and
``26-containerd`` (dockerd 26.1.5 with buildx, classic or containerd image store: the
latter exports BuildKit's own cache instead of keeping images). The project is the
bundled example; both cache backends (folder, and a real registry). Chains of fresh
machines with edits are tests/test_cache_chain.py's.
"""

from __future__ import annotations

import contextlib
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

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.builder import Builder, choose_builder
from layerkeep.building.image import BuildReport
from layerkeep.cache.backend import build_with_cache, load_cache, save_cache
from layerkeep.cache.layer_load import LoadReport
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, connect
from layerkeep.core.settings import Settings, load_settings

pytestmark = [pytest.mark.docker, pytest.mark.private_engines]

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

    def builder(self, kind: str, settings: Settings) -> Builder:
        """The builder the settings resolve to on ``kind``'s engine."""
        second, connected = self.engine(kind)
        return choose_builder(settings.builder, second.environ, engine=connected)

    def build(
        self, kind: str, settings: Settings, lines: list[str] | None = None
    ) -> BuildReport:
        """Build the example on ``kind``'s engine with the settings' builder, as
        image.build does; the report (its output goes into ``lines`` when given)."""
        second, connected = self.engine(kind)
        lines = [] if lines is None else lines
        report = build_with_cache(
            connected, settings, self.builder(kind, settings), second.environ,
            log=lines.append,
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
            second, connected = self.engine(kind)
            settings = self.settings(kind, cold.image, backend, cold.cache_dir)
            if backend == "registry" and self.builder(kind, settings).exports_cache:
                # BuildKit writes the registry cache while it builds: build again.
                self.build(kind, settings)
            save_cache(
                connected, settings, self.builder(kind, settings), second.environ, log=print
            )
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
        return load_cache(connected, settings, self.builder(kind, settings), log=print)


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


def exports(kind: str) -> bool:
    """Whether the kind keeps BuildKit's own cache rather than images."""
    return kind in {"26-containerd", "fresh-26-containerd"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_wiped_engine_reuses_every_step_after_restoring(
    pool: Pool, kind: str, backend: str
) -> None:
    cold = pool.cold(kind, backend)
    assert cold.report.builder.kind == ("legacy" if kind.startswith("legacy") else "buildkit")
    assert cold.report.builder.exports_cache == exports(kind)
    assert cold.report.tally.reused == 0, cold.report.tally.reused_by_key
    assert cold.report.tally.total >= 9
    assert "no cached image was used" not in cold.report.reuse

    settings = pool.settings(kind, cold.image, backend, cold.cache_dir)
    restored = pool.restore(kind, settings)
    # BuildKit's own cache is read by the build; images are restored by cache.load.
    assert len(restored.restored) == (0 if exports(kind) else 2), restored

    warm = pool.build(kind, settings)
    assert warm.tally.total == cold.report.tally.total
    assert warm.tally.reused == warm.tally.total, warm.tally.reused_by_key
    # The engine had nothing of its own, so the line credits the restored cache alone.
    assert "own build cache" not in warm.reuse
    if exports(kind):
        assert "from BuildKit's own cache, as the last save exported it" in warm.reuse
        assert [str(image) for image in warm.images] == [cold.image + ":latest"]
    else:
        assert "of 2 cached image(s)" in warm.reuse


@pytest.mark.parametrize("kind_name", [k for k in KINDS if not exports(k)])
def test_hits_from_the_engines_own_cache_are_not_credited_to_a_restore(
    pool: Pool, kind_name: str
) -> None:
    cold = pool.cold(kind_name, "dir")
    settings = pool.settings(kind_name, cold.image, "dir", cold.cache_dir)
    _, connected = pool.engine(kind_name)
    pool.build(kind_name, settings)  # images present and a warm builder cache
    for image in images_to_cache(settings):
        connected.remove_image(image, force=True)
    # Nothing restored: whatever is reused comes from the engine itself, and the line
    # says so. The classic builder's cache is its images: none left, nothing reused.
    again = pool.build(kind_name, settings)
    assert again.cache_from == ()
    if kind_name.startswith("legacy"):
        assert again.tally.reused == 0
        assert "cached image(s)" not in again.reuse
    else:
        assert again.tally.reused == again.tally.total
        assert "from this engine's own build cache: no cached image was used" in again.reuse


CROSSINGS = [
    ("buildkit-20.10", "26-classic"),
    ("26-classic", "buildkit-20.10"),
    ("buildkit-20.10", "26-containerd"),
    ("26-containerd", "buildkit-20.10"),
    ("26-classic", "26-containerd"),
    ("26-containerd", "26-classic"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("source", "target"), CROSSINGS)
def test_what_a_cache_saved_on_one_engine_kind_gives_another(
    pool: Pool, source: str, target: str, backend: str
) -> None:
    try:
        cold = pool.cold(source, backend)
        pool.engine(target)
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    settings = pool.settings(target, cold.image, backend, cold.cache_dir)
    lines: list[str] = []
    pool.wipe(target, settings)
    _, connected = pool.engine(target)
    load_cache(connected, settings, pool.builder(target, settings), log=lines.append)
    warm = pool.build(target, settings, lines)
    print(f"{source} -> {target} ({backend}): {warm.reuse}")
    if exports(source) != exports(target):
        # One keeps images, the other BuildKit's export: neither reads the other's, and
        # the folder cache says so (the registry's tags are apart, so a cold build).
        assert warm.tally.reused == 0, warm.reuse
        if backend == "dir":
            store = "classic image store" if exports(target) else "containerd image store"
            assert any(store in line and "a cold build" in line for line in lines), lines
    else:
        # BuildKit 0.8 (20.10) and 0.13 (26) compute different step keys, so an inline
        # cache made by one never matches the other's (0/9 both ways): the build says so.
        assert warm.tally.reused == 0, warm.reuse
        assert any("another Docker version's BuildKit" in line for line in lines), lines
        # The build record is found (by image content where the two image stores give
        # the images other ids) and names the two Docker versions as the reason.
        assert any(
            "BuildKit before and since Docker 23" in reason for reason in warm.miss_reasons
        ), warm.miss_reasons
    for image in images_to_cache(settings):
        if connected.image_id(image):
            connected.remove_image(image, force=True)


def test_a_registry_cache_behind_a_login_hits_on_the_containerd_store(
    pool: Pool, tmp_path: Path
) -> None:
    # BuildKit itself reads and writes the registry cache here, with layerkeep's login
    # (a private DOCKER_CONFIG): the registry refuses anyone else.
    try:
        cold = pool.cold("26-containerd", "dir")
        pool.engine("fresh-26-containerd")
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))
    password = secrets.token_hex(8)
    with running_registry(tmp_path / "registry", user="ci", password=password) as locked:
        saving = pool.settings(
            "26-containerd", cold.image, "registry", cold.cache_dir, registry=locked
        )
        written: list[str] = []
        pool.build("26-containerd", saving, written)
        settings = pool.settings(
            "fresh-26-containerd", cold.image, "registry", cold.cache_dir, registry=locked
        )
        second, target = pool.engine("fresh-26-containerd")
        config = Path(second.environ["DOCKER_CONFIG"]) / "config.json"
        before = config.read_bytes() if config.exists() else None
        pool.wipe("fresh-26-containerd", settings)
        lines: list[str] = []
        warm = pool.build("fresh-26-containerd", settings, lines)
    assert "from BuildKit's own cache" in warm.reuse
    assert warm.tally.reused == warm.tally.total == cold.report.tally.total, lines
    assert not any(password in line for line in written + lines)
    # The user's own docker config is left as it was.
    assert (config.read_bytes() if config.exists() else None) == before
    for image in images_to_cache(settings):
        if target.image_id(image):
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


def test_each_kind_builds_with_the_builder_it_should(pool: Pool, kind: str) -> None:
    second, connected = pool.engine(kind)
    chosen = choose_builder(BUILDER_OF.get(kind, "auto"), second.environ, engine=connected)
    assert chosen.exports_cache == exports(kind)
    if kind.startswith("legacy"):
        assert chosen.kind == "legacy"
    elif kind.startswith("26"):
        # buildx from the private DOCKER_CONFIG, with the 26 CLI.
        assert chosen.kind == "buildkit"
        assert chosen.cli.startswith(str(ensure_docker26().prefix))
    else:
        assert chosen.kind == "buildkit"
