"""cache.save's reading on the real engine: what it reads, and what builds leave behind.

Timings live in bench/bench_save_load.py; these tests check behaviour only, from the
save report (``engine_reads`` counts `docker save` calls, ``bytes_read`` their bytes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from sample_project import build, make_project

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.builder import choose_builder
from layerkeep.building.image import build_image
from layerkeep.cache.archive import LayerSource, legacy_archive
from layerkeep.cache.layer_load import load_images
from layerkeep.cache.layer_save import SaveReport, save_images
from layerkeep.cache.store import CacheDir
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.settings import Settings, load_settings

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
BASE = "debian:bookworm-slim"


def quiet(_: str) -> None:
    pass


def save(engine: Engine, cache: CacheDir, images: list[str]) -> tuple[SaveReport, list[str]]:
    lines: list[str] = []
    return save_images(engine, cache, images, log=lines.append), lines


def build_plain(engine: Engine, folder: Path, tag: str, dockerfile: str) -> str:
    """A one-off image from ``dockerfile`` (classic builder); its id."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(dockerfile)
    return engine.build(folder, tag=tag)


def reload_with_config(engine: Engine, cache: CacheDir, tag: str, change: str) -> str:
    """Load the cached image of ``tag`` again with its config changed; the new id.

    Its layers are all in the engine, so the archive carries none of them.
    """
    cached = cache.read_manifest().images[tag]
    config = json.loads(cached.config)
    if change == "buildkit cache":
        config["moby.buildkit.cache.v0"] = "eyJsYXllcnMiOltdfQ=="  # another inline cache
    else:
        config["config"].setdefault("Labels", {})["changed"] = "yes"
    text = json.dumps(config)
    layers = [LayerSource(digest, 0, None) for digest in cached.layers]
    engine.load_archive(legacy_archive(text, layers, [tag]), image=tag)
    new_id = engine.image_id(tag)
    assert new_id is not None
    assert new_id != cached.id
    return new_id


@pytest.fixture
def project(engine: Engine, unique_repository: str, tmp_path: Path) -> Settings:
    return make_project(tmp_path, unique_repository, engine)


def test_an_unchanged_buildkit_rebuild_is_not_read_again(
    engine: Engine, project: Settings
) -> None:
    cache = CacheDir(project.cache_dir)
    build(engine, project, "buildkit")
    first, _ = save(engine, cache, images_to_cache(project))
    assert first.engine_reads == 1
    again = build(engine, project, "buildkit")
    assert again.tally.reused == again.tally.total

    second, lines = save(engine, cache, images_to_cache(project))

    assert second.engine_reads == 0
    assert second.bytes_read == 0
    assert sorted(second.unchanged) == sorted(images_to_cache(project))
    assert any("up to date" in line for line in lines)


@pytest.mark.parametrize(("change", "reads"), [("buildkit cache", 0), ("label", 1)])
def test_only_builder_cache_metadata_counts_as_unchanged(
    engine: Engine, project: Settings, change: str, reads: int
) -> None:
    cache = CacheDir(project.cache_dir)
    build(engine, project, "legacy")
    save(engine, cache, images_to_cache(project))
    app = str(project.require_image())
    new_id = reload_with_config(engine, cache, app, change)

    report, _ = save(engine, cache, images_to_cache(project))

    assert report.engine_reads == reads
    cached = cache.read_manifest().images[app]
    # An unchanged image keeps its cached copy; a changed one is the engine's now.
    assert (cached.engine_id == new_id) == (reads == 1)


def test_one_save_reads_a_shared_base_once(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    tags = [f"{unique_repository}/shared:{name}" for name in ("one", "two")]
    for number, tag in enumerate(tags):
        build_plain(engine, tmp_path / tag[-3:], tag, f"FROM {BASE}\nRUN echo {number} > /n\n")
    alone = [sum(map(len, engine.save_image(tag))) for tag in tags]
    together = sum(map(len, engine.save_images(tags)))
    base_size = int((engine.image_attrs(BASE) or {})["Size"])

    report, _ = save(engine, CacheDir(tmp_path / "cache"), tags)

    assert report.engine_reads == 1
    assert report.bytes_read == together
    assert report.bytes_read < sum(alone) - base_size // 2
    assert sorted(report.saved) == sorted(tags)
    assert report.layers_written == 3  # the base and each image's own layer


def test_a_small_new_layer_is_the_only_one_written(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    tag = f"{unique_repository}/grows:1"
    big = f"FROM {BASE}\nRUN head -c 6000000 /dev/urandom > /big\n"
    build_plain(engine, tmp_path / "one", tag, big)
    cache = CacheDir(tmp_path / "cache")
    save(engine, cache, [tag])
    # The big layer was the top one; now it is below a new one: another name in the
    # 20.10 archive, so it is recognised by its size (and the manifest confirms it).
    build_plain(engine, tmp_path / "two", tag, big + "RUN echo small > /small\n")

    report, _ = save(engine, cache, [tag])

    assert report.engine_reads == 1
    assert report.layers_written == 1
    assert report.bytes_written < 100_000


def test_a_new_layer_the_size_of_a_cached_one_is_read_again(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    tag = f"{unique_repository}/twins:1"
    # The repository's name makes the layers this test's own (no cached step matches).
    first = f"FROM {BASE}\nENV TEST={unique_repository}\nRUN head -c 5000000 /dev/urandom > /blob\n"
    build_plain(engine, tmp_path / "one", tag, first)
    cache = CacheDir(tmp_path / "cache")
    save(engine, cache, [tag])
    # The same file written again: a layer of exactly the cached one's size.
    build_plain(engine, tmp_path / "two", tag, first + "RUN head -c 5000000 /dev/urandom > /blob\n")

    report, _ = save(engine, cache, [tag])

    assert report.engine_reads == 2
    assert report.layers_written == 1
    engine.remove_image(tag)
    loaded = load_images(engine, cache, log=quiet)
    assert loaded.restored == [tag]
    assert loaded.failed == []


@pytest.fixture
def example(engine: Engine, unique_repository: str, tmp_path: Path) -> Settings:
    root = tmp_path / "project"
    shutil.copytree(REPO / "example", root / "example")
    # An app image of its own: BuildKit gives a fully cached build the same id, so the
    # example built by a test in another file could otherwise hold this test's images.
    config = root / "example" / "shortener" / "config.py"
    config.write_text(config.read_text() + f"\n# {unique_repository}\n")
    (root / ".env").write_text(
        f"LAYERKEEP_IMAGE={unique_repository}/shortener\nLAYERKEEP_CONTEXT=example\n"
        "LAYERKEEP_CACHE_DIR=cache\n"
    )
    return load_settings(root, {}, git_facts=lambda _: GitFacts("", ""))


@pytest.mark.parametrize("kind", ["buildkit", "legacy"])
def test_no_dangling_images_after_three_builds_and_saves(
    engine: Engine, example: Settings, kind: str
) -> None:
    builder = choose_builder(kind, os.environ, engine=engine)
    cache = CacheDir(example.cache_dir)
    source = example.context / "shortener" / "config.py"
    seen: set[str] = set()
    lines: list[str] = []
    for run in range(3):
        if run == 2:
            # A code change: the app image really is replaced.
            source.write_text(source.read_text() + "\n# changed\n")
        build_image(engine, example, builder, os.environ, log=lines.append)
        save_images(engine, cache, images_to_cache(example), log=quiet)
        seen |= {engine.image_id(image) or "" for image in images_to_cache(example)}

    dangling = [
        image_id for image_id in seen
        if (attrs := engine.image_attrs(image_id)) is not None and not attrs.get("RepoTags")
    ]
    assert dangling == []
    assert len(seen) >= 3  # the code change gave a new app image, and the old one went
    # Unknown when another job's build asked the engine its disk usage at the same time.
    figures = ("MB freed", "(freed: unknown, the engine was busy)")
    assert any(line.endswith(figures) for line in lines)
