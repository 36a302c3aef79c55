"""The folder cache under damage and faults: it heals itself, says one line, loses nothing,
and never moves a tag another image holds.

Full and read-only disks are real: a small tmpfs mounted (and remounted read-only) under
the test's folder, which needs root, as the engine does.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sample_project import build, make_project

from layerkeep.building.build_plan import images_to_cache
from layerkeep.cache.blob_writer import BlobWriter
from layerkeep.cache.layer_load import cache_reference, cache_sources, load_images
from layerkeep.cache.layer_save import save_images
from layerkeep.cache.manifest import Blob, Manifest
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CacheUnavailable
from layerkeep.core.engine import Engine
from layerkeep.core.errors import LayerkeepError
from layerkeep.core.settings import Settings


def quiet(_: str) -> None:
    pass


def snapshot(cache: CacheDir) -> dict[str, bytes]:
    """Every file of the cache but its lock, with its content."""
    return {
        str(path.relative_to(cache.root)): path.read_bytes()
        for path in sorted(cache.root.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def wipe(engine: Engine, settings: Settings) -> None:
    for image in images_to_cache(settings):
        engine.remove_image(image, force=True)


def one_line(error: LayerkeepError, *needles: str) -> None:
    line = error.one_line()
    assert "\n" not in line
    for needle in needles:
        assert needle in line


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A real, small filesystem at ``folder`` (unmounted afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "layerkeep-test", str(folder)], check=True
    )
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def grow_app(settings: Settings, megabytes: int) -> None:
    """Give the app image a new layer of incompressible bytes."""
    dockerfile = settings.project_dir / "Dockerfile"
    dockerfile.write_text(
        dockerfile.read_text() + f"RUN head -c {megabytes}000000 /dev/urandom > /app/big\n"
    )


# --- the store alone ---------------------------------------------------------------------


def store(cache: CacheDir, content: bytes) -> tuple[str, Blob]:
    """Write one layer into the cache the way a save does."""
    with BlobWriter(cache, level=3, threads=1) as writer:
        return writer.write([content[:60_000], content[60_000:]])()


def test_a_blob_with_its_size_but_other_bytes_fails_the_check(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path)
    digest, blob = store(cache, os.urandom(200_000))
    manifest = Manifest(blobs={digest: blob})
    assert cache.has_blob(manifest, digest)
    path = cache.blob_path(blob)
    data = bytearray(path.read_bytes())
    data[1000:1016] = bytes(b ^ 0xFF for b in data[1000:1016])
    path.write_bytes(bytes(data))

    assert cache.blob_present(manifest, digest)  # the stat alone is fooled
    assert not cache.has_blob(manifest, digest)


def test_storing_again_replaces_a_damaged_file(tmp_path: Path) -> None:
    cache = CacheDir(tmp_path)
    content = os.urandom(100_000)
    digest, blob = store(cache, content)
    cache.blob_path(blob).write_bytes(b"truncated")

    again, fresh = store(cache, content)

    assert again == digest
    assert cache.has_blob(Manifest(blobs={digest: fresh}), digest)
    assert fresh.stored == cache.blob_path(fresh).stat().st_size


# --- self-healing, on the real engine ----------------------------------------------------


@pytest.fixture
def saved(engine: Engine, unique_repository: str, tmp_path: Path) -> Iterator[Settings]:
    """The sample project built and saved; internal names it may get removed afterwards."""
    settings = make_project(tmp_path, unique_repository, engine, unique_base=True)
    build(engine, settings, "legacy")
    save_images(engine, CacheDir(settings.cache_dir), images_to_cache(settings), log=quiet)
    yield settings
    for image in images_to_cache(settings):
        engine.remove_image(cache_reference(image), force=True)


@pytest.mark.docker
def test_a_damaged_blob_is_dropped_at_load_and_rewritten_by_the_next_save(
    engine: Engine, saved: Settings
) -> None:
    cache = CacheDir(saved.cache_dir)
    stage, app, base = images_to_cache(saved)
    assert app == str(saved.require_image())
    kept = b"".join(engine.save_image(stage))
    digest = cache.read_manifest().images[stage].layers[-2]  # the stage's 3 MB layer
    path = cache.blob_path(cache.read_manifest().blobs[digest])
    data = bytearray(path.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 16] = os.urandom(16)
    path.write_bytes(bytes(data))
    wipe(engine, saved)
    lines: list[str] = []

    damaged = load_images(engine, cache, log=lines.append)

    assert damaged.failed == [stage]
    assert sorted(damaged.restored) == sorted([app, base])
    assert damaged.damaged == [digest]
    assert any(path.name in line and "skipped" in line for line in lines)
    assert digest not in cache.read_manifest().blobs  # remembered as bad
    # The engine gets the very same stage image back (same id), as a rebuild may give.
    engine.load_archive([kept], image=stage)

    healed = save_images(engine, cache, images_to_cache(saved), log=lines.append)

    assert healed.repaired == [stage]
    assert healed.layers_written == 1
    assert cache.has_blob(cache.read_manifest(), digest)
    wipe(engine, saved)
    again = load_images(engine, cache, log=quiet)
    assert again.failed == []
    assert sorted(again.restored) == sorted([app, stage, base])


@pytest.mark.docker
def test_an_unchanged_image_whose_blob_went_missing_is_read_again(
    engine: Engine, saved: Settings
) -> None:
    cache = CacheDir(saved.cache_dir)
    app = str(saved.require_image())
    manifest = cache.read_manifest()
    cache.blob_path(manifest.blobs[manifest.images[app].layers[-1]]).unlink()

    report = save_images(engine, cache, images_to_cache(saved), log=quiet)

    assert report.repaired == [app]
    assert report.layers_written == 1
    manifest = cache.read_manifest()
    assert all(cache.has_blob(manifest, digest) for digest in manifest.images[app].layers)


@pytest.mark.docker
def test_a_truncated_blob_and_an_emptied_manifest_are_rebuilt_whole(
    engine: Engine, saved: Settings
) -> None:
    cache = CacheDir(saved.cache_dir)
    app = str(saved.require_image())
    manifest = cache.read_manifest()
    truncated = cache.blob_path(manifest.blobs[manifest.images[app].layers[-1]])
    truncated.write_bytes(truncated.read_bytes()[:-100])
    cache.manifest_path.write_text("")
    lines: list[str] = []

    save_images(engine, cache, images_to_cache(saved), log=lines.append)

    assert any("ignoring the cache" in line for line in lines)
    manifest = cache.read_manifest()
    assert all(cache.has_blob(manifest, digest) for digest in manifest.blobs)
    wipe(engine, saved)
    assert load_images(engine, cache, log=quiet).failed == []


@pytest.mark.docker
def test_a_save_checks_the_blobs_it_reuses(engine: Engine, saved: Settings) -> None:
    cache = CacheDir(saved.cache_dir)
    app = str(saved.require_image())
    manifest = cache.read_manifest()
    shared = manifest.images[app].layers[-4]  # COPY --from=deps: kept by the changed app
    path = cache.blob_path(manifest.blobs[shared])
    data = bytearray(path.read_bytes())
    data[100:116] = os.urandom(16)
    path.write_bytes(bytes(data))
    (saved.project_dir / "src" / "main.txt").write_text("v2\n")
    build(engine, saved, "legacy")

    report = save_images(engine, cache, images_to_cache(saved), log=quiet)

    # The stage is unchanged (left alone); the app is re-read and its damaged layer rewritten.
    assert report.saved == [app]
    assert cache.has_blob(cache.read_manifest(), shared)


# --- faults: one line, nothing lost ------------------------------------------------------


@pytest.mark.docker
def test_a_full_disk_is_one_line_and_the_cache_stays_whole(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    settings = make_project(tmp_path, unique_repository, engine, unique_base=True)
    with tmpfs(settings.cache_dir, "64m"):  # the first save takes about 30 MB
        cache = CacheDir(settings.cache_dir)
        build(engine, settings, "legacy")
        save_images(engine, cache, images_to_cache(settings), log=quiet)
        before = snapshot(cache)
        grow_app(settings, 40)
        build(engine, settings, "legacy")

        with pytest.raises(CacheUnavailable) as caught:
            save_images(engine, cache, images_to_cache(settings), log=quiet)

        one_line(caught.value, "no space left", str(cache.root), "LAYERKEEP_CACHE_DIR")
        assert snapshot(cache) == before
        wipe(engine, settings)
        restored = load_images(engine, cache, log=quiet).restored
        assert sorted(restored) == sorted(images_to_cache(settings))


@pytest.mark.docker
def test_a_read_only_cache_still_loads_and_a_save_says_one_line(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    settings = make_project(tmp_path, unique_repository, engine, unique_base=True)
    with tmpfs(settings.cache_dir, "200m"):
        cache = CacheDir(settings.cache_dir)
        build(engine, settings, "legacy")
        save_images(engine, cache, images_to_cache(settings), log=quiet)
        before = snapshot(cache)
        subprocess.run(["mount", "-o", "remount,ro", str(cache.root)], check=True)
        (settings.project_dir / "src" / "main.txt").write_text("v2\n")
        build(engine, settings, "legacy")

        with pytest.raises(CacheUnavailable) as caught:
            save_images(engine, cache, images_to_cache(settings), log=quiet)

        one_line(caught.value, "cannot write", str(cache.root), "writable")
        assert snapshot(cache) == before
        wipe(engine, settings)
        restored = load_images(engine, cache, log=quiet).restored
        assert sorted(restored) == sorted(images_to_cache(settings))


@pytest.mark.docker
def test_a_cache_path_that_is_a_file_is_one_line(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    settings = make_project(tmp_path, unique_repository, engine)
    settings.cache_dir.write_text("not a folder\n")
    cache = CacheDir(settings.cache_dir)

    with pytest.raises(CacheUnavailable) as saving:
        save_images(engine, cache, [str(settings.require_image())], log=quiet)
    with pytest.raises(CacheUnavailable) as loading:
        load_images(engine, cache, log=quiet)

    for caught in (saving, loading):
        one_line(caught.value, f"{cache.root} is not a folder", "LAYERKEEP_CACHE_DIR")
    assert settings.cache_dir.read_text() == "not a folder\n"


@pytest.mark.docker
def test_a_folder_inside_blobs_is_one_line(engine: Engine, saved: Settings) -> None:
    cache = CacheDir(saved.cache_dir)
    stray = cache.root / "blobs" / "stray"
    stray.mkdir()
    before = snapshot(cache)
    (saved.project_dir / "src" / "main.txt").write_text("v2\n")
    build(engine, saved, "legacy")

    with pytest.raises(CacheUnavailable) as caught:
        save_images(engine, cache, images_to_cache(saved), log=quiet)

    one_line(caught.value, str(stray), "remove it")
    assert snapshot(cache) == before


# --- tags the user owns ------------------------------------------------------------------


@pytest.mark.docker
def test_load_leaves_a_tag_that_names_another_image_alone(
    engine: Engine, saved: Settings
) -> None:
    cache = CacheDir(saved.cache_dir)
    _, app, base = images_to_cache(saved)
    assert app == str(saved.require_image())
    cached_base = cache.read_manifest().images[base].id
    # The user rebuilt the base tag with other content, and the app is gone.
    engine.tag_image("python:3.11-slim", base)
    users = engine.image_id(base)
    engine.remove_image(app, force=True)
    engine.tag_image("redis:7", app)
    users_app = engine.image_id(app)
    lines: list[str] = []

    report = load_images(engine, cache, log=lines.append)

    assert engine.image_id(base) == users
    assert engine.image_id(app) == users_app
    assert sorted(report.tags_left) == sorted([app, base])
    assert any(line.startswith(f"left {base} alone") for line in lines)
    assert engine.image_id(cache_reference(base)) == cached_base
    assert engine.image_id(cache_reference(app)) == cache.read_manifest().images[app].id
    assert app in report.restored
    assert cache_reference(app) in report.cache_sources
    assert sorted(cache_sources(engine, images_to_cache(saved))) == sorted(
        [cache_reference(app), cache_reference(base)]
    )
