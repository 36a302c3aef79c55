"""A job restoring from the registry cache while cache.prune removes its scope: the
engine ends up with the whole scope's images or the fallback branch's, never a mix.

Real registry (deletes enabled), real engine pulls through cache.load's own function
(``load_cache``). Each scope's images are tiny random ones, so each scope's image ids
are its own and tell where every restored image came from.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from registry_setup import Registry, running_registry
from test_cache_budget import random_image

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.builder import Builder
from layerkeep.cache.backend import load_cache
from layerkeep.cache.prune import prune_registry
from layerkeep.cache.registry_backend import cache_location, cache_tags
from layerkeep.cache.scope_marker import write_marker
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.imageref import ImageRef
from layerkeep.core.progress import Meter, Unit, silent
from layerkeep.core.registry import push_tag
from layerkeep.core.registry_api import RegistryClient
from layerkeep.core.registry_credentials import Credentials, path_in_registry
from layerkeep.core.registry_failures import Retries
from layerkeep.core.settings import Settings, load_settings

pytestmark = pytest.mark.docker
DOCKERFILE = "FROM scratch AS builder\nCOPY a /a\nFROM scratch\nCOPY b /b\n"


def quiet(_: str) -> None:
    pass


@dataclass
class Setup:
    engine: Engine
    registry: Registry
    project: Path
    image: str

    def settings(self, branch: str) -> Settings:
        environ = {
            "LAYERKEEP_IMAGE": self.image,
            "LAYERKEEP_CACHE_BACKEND": "registry",
            "LAYERKEEP_REGISTRY": self.registry.address,
            "LAYERKEEP_CACHE_FALLBACK_BRANCH": "main",
            "LAYERKEEP_BRANCH": branch,
        }
        return load_settings(self.project, environ, git_facts=lambda _: GitFacts("", ""))

    def save(self, branch: str, *, age_days: float, now: float) -> dict[str, str]:
        """Push a scope of fresh images, marked saved ``age_days`` before ``now``;
        local image -> the id its cache tag holds."""
        settings = self.settings(branch)
        repository = cache_location(settings).repository
        ids = {}
        for local, tag in cache_tags(settings, images_to_cache(settings)).items():
            target = ImageRef(repository, f"{branch}--{tag}")
            ids[local] = random_image(self.engine, str(target), 0.01)
            push_tag(self.engine, target, Credentials(self.registry.address, "", ""),
                     Retries(1, quiet))
        with RegistryClient(
            Credentials(self.registry.address, "", ""), environ={}, timeout=10
        ) as client:
            write_marker(client, path_in_registry(repository), branch, state="saved",
                         branch=branch, build_id=f"save-{branch}", at=now - age_days * 86400)
        return ids

    def restored(self, settings: Settings) -> dict[str, str | None]:
        """Local image -> the id the engine now gives it."""
        return {image: self.engine.image_id(image) for image in images_to_cache(settings)}


@pytest.fixture
def setup(engine: Engine, unique_repository: str, tmp_path: Path) -> Iterator[Setup]:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    with running_registry(tmp_path / "registry") as registry:
        try:
            yield Setup(engine, registry, tmp_path, f"{unique_repository}/app")
        finally:
            for image in engine.api.images():
                for tag in image.get("RepoTags") or []:
                    if tag.startswith(registry.address):
                        engine.remove_image(tag, force=True)


def prune(setup: Setup, **kwargs: object) -> None:
    prune_registry(setup.settings("main"), {}, older_than=14, live_branches=None,
                   dry_run=False, log=quiet, **kwargs)  # type: ignore[arg-type]


def test_a_restore_between_any_two_deletes_gets_one_whole_scope(setup: Setup) -> None:
    now = time.time()
    main = setup.save("main", age_days=1, now=now)
    feature = setup.settings("old")
    outcomes = []
    for step in range(len(main) + 2):  # before, after each image's tag, after the marker
        old = setup.save("old", age_days=40, now=now)
        assert set(old.values()).isdisjoint(main.values())
        deletes: list[str] = []

        def restore_at(tag: str, step: int = step, deletes: list[str] = deletes) -> None:
            deletes.append(tag)
            if len(deletes) == step:
                load_cache(setup.engine, feature, Builder("legacy"), log=quiet, environ={})

        if step == 0:
            load_cache(setup.engine, feature, Builder("legacy"), log=quiet, environ={})
        prune(setup, deleted=restore_at)
        got = setup.restored(feature)
        outcomes.append("old" if got == old else "main" if got == main else f"mixed {got}")
    assert outcomes == ["old", "main", "main", "main"]


def test_a_restore_a_whole_prune_overtakes_ends_with_the_fallback_scope(setup: Setup) -> None:
    now = time.time()
    main = setup.save("main", age_days=1, now=now)
    old = setup.save("old", age_days=40, now=now)
    pulls: list[str] = []

    def progress(label: str, total: int | None = None, unit: Unit = "B") -> Meter:
        if label.startswith("pull "):
            pulls.append(label)
            if len(pulls) == 2:  # the first image came from the scope; the prune runs now
                prune(setup)
        return silent(label, total, unit)

    lines: list[str] = []
    feature = setup.settings("old")
    report = load_cache(setup.engine, feature, Builder("legacy"), log=lines.append,
                        progress=progress, environ={})
    assert setup.restored(feature) == main
    assert set(report.restored) | set(report.present) == set(main)
    assert setup.restored(feature) != old
    assert "the cache scope old was pruned while it was read: loading main's scope instead" in lines
