"""The layer cache on the real engine: a restored cache is really used by the next build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from sample_project import build, make_project

from layerkeep.building.build_plan import images_to_cache
from layerkeep.cache.layer_load import load_images
from layerkeep.cache.layer_save import save_images
from layerkeep.cache.store import CacheDir
from layerkeep.core.engine import Engine
from layerkeep.core.settings import Settings

pytestmark = pytest.mark.docker

# A save in a process of its own, so the test can kill it.
SAVE_SCRIPT = """
import os, sys
from pathlib import Path
from layerkeep.cache.layer_save import save_images
from layerkeep.cache.store import CacheDir
from layerkeep.core.engine import connect
save_images(connect(os.environ), CacheDir(Path(sys.argv[1])), sys.argv[2:], log=print)
"""


def wipe_like_a_fresh_machine(engine: Engine, settings: Settings) -> None:
    """Remove every image the project uses: with the classic builder on a base of its own
    (``unique_base``), that is all the build cache it had, and nobody else's is touched.
    BuildKit keeps a cache of its own that only a global prune removes: its restores are
    tested on throw-away engines (test_engine_kinds.py, test_ci_example.py)."""
    for image in images_to_cache(settings):
        engine.remove_image(image, force=True)
    assert all(engine.image_id(image) is None for image in images_to_cache(settings))


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Saved:
    """A project built with the classic builder and saved into its cache."""

    settings: Settings
    cache: CacheDir


@pytest.fixture
def saved(engine: Engine, unique_repository: str, tmp_path: Path) -> Saved:
    settings = make_project(tmp_path, unique_repository, engine, unique_base=True)
    cache = CacheDir(settings.cache_dir)
    build(engine, settings, "legacy")
    save_images(engine, cache, images_to_cache(settings), log=quiet)
    return Saved(settings, cache)


def test_restored_cache_reuses_every_step(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    kind = "legacy"
    settings = make_project(tmp_path, unique_repository, engine, unique_base=True)
    cache = CacheDir(settings.cache_dir)
    cold = build(engine, settings, kind)
    assert cold.tally.reused == 0
    assert cold.tally.total >= 5
    save_images(engine, cache, images_to_cache(settings), log=quiet)
    wipe_like_a_fresh_machine(engine, settings)

    loaded = load_images(engine, cache, log=quiet)

    app, stage, base = images_to_cache(settings)
    assert sorted(loaded.restored) == sorted([app, stage, base])
    assert loaded.present == []
    assert all(engine.image_id(image) is not None for image in (app, stage, base))
    assert loaded.failed == []
    warm = build(engine, settings, kind)
    assert (warm.tally.reused, warm.tally.total) == (cold.tally.total, cold.tally.total)
    assert len(warm.cache_from) == 2


def test_source_change_rebuilds_only_the_steps_after_it(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    kind = "legacy"
    settings = make_project(tmp_path, unique_repository, engine, unique_base=True)
    cache = CacheDir(settings.cache_dir)
    build(engine, settings, kind)
    save_images(engine, cache, images_to_cache(settings), log=quiet)
    wipe_like_a_fresh_machine(engine, settings)
    load_images(engine, cache, log=quiet)
    (tmp_path / "src" / "main.txt").write_text("changed\n")

    report = build(engine, settings, kind)

    # Steps up to COPY src stay cached (deps stage, COPY --from, WORKDIR); from there on,
    # everything rebuilds.
    steps = list(report.tally.reused_by_key.items())
    changed_at = next(i for i, (key, _) in enumerate(steps) if "COPY src" in key)
    assert changed_at >= 3
    assert all(reused for _, reused in steps[:changed_at])
    assert not any(reused for _, reused in steps[changed_at:])
    assert any("cat /app/src/main.txt" in key for key, _ in steps[changed_at:])
    output = engine.client.containers.run(str(settings.require_image()), remove=True)
    assert output == b"changed\n"


def test_unchanged_save_skips_and_app_change_keeps_other_layers(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    settings = make_project(tmp_path, unique_repository, engine)
    cache = CacheDir(settings.cache_dir)
    build(engine, settings, "legacy")
    first = save_images(engine, cache, images_to_cache(settings), log=quiet)
    assert sorted(first.saved) == sorted(images_to_cache(settings))
    blobs_before = {p.name: p.stat().st_mtime_ns for p in (cache.root / "blobs").iterdir()}
    manifest_before = cache.manifest_path.stat().st_mtime_ns

    again = save_images(engine, cache, images_to_cache(settings), log=quiet)

    assert again.skipped
    assert cache.manifest_path.stat().st_mtime_ns == manifest_before

    (tmp_path / "src" / "main.txt").write_text("v2\n")
    build(engine, settings, "legacy")
    changed = save_images(engine, cache, images_to_cache(settings), log=quiet)

    assert changed.saved == [str(settings.require_image())]
    assert changed.layers_written == 2  # COPY src and the RUN after it
    blobs_after = {p.name: p.stat().st_mtime_ns for p in (cache.root / "blobs").iterdir()}
    kept = set(blobs_before) & set(blobs_after)
    assert all(blobs_before[name] == blobs_after[name] for name in kept)
    # The old app layers went away: the cache does not grow build after build.
    assert len(blobs_after) == len(blobs_before)
    assert changed.bytes_freed > 0


def test_images_no_longer_wanted_are_dropped(engine: Engine, saved: Saved) -> None:
    cache = saved.cache
    images = images_to_cache(saved.settings)
    size_with_all = sum(p.stat().st_size for p in (cache.root / "blobs").iterdir())

    report = save_images(engine, cache, images[:1], log=quiet)

    assert sorted(report.dropped) == sorted(images[1:])
    assert set(cache.read_manifest().images) == {images[0]}
    size_after = sum(p.stat().st_size for p in (cache.root / "blobs").iterdir())
    assert size_after < size_with_all


def test_damaged_layer_is_skipped_with_its_file_name(engine: Engine, saved: Saved) -> None:
    settings, cache = saved.settings, saved.cache
    manifest = cache.read_manifest()
    stage, _, base = images_to_cache(settings)
    assert stage.endswith("/app:latest-stage-deps")
    # The deps stage's own layer (the 3 MB blob), which the final image shares.
    damaged = cache.blob_path(manifest.blobs[manifest.images[stage].layers[-2]])
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = os.urandom(64)
    damaged.write_bytes(bytes(data))
    wipe_like_a_fresh_machine(engine, settings)
    lines: list[str] = []

    report = load_images(engine, cache, log=lines.append)

    assert stage in report.failed
    assert base in report.restored
    assert any(damaged.name in line and "skipped" in line for line in lines)
    assert engine.image_id(stage) is None
    # The build goes on, cold where the cache was damaged.
    after = build(engine, settings, "legacy")
    assert after.tally.total > after.tally.reused


def test_truncated_and_foreign_files_are_reported(engine: Engine, saved: Saved) -> None:
    settings, cache = saved.settings, saved.cache
    manifest = cache.read_manifest()
    app = str(settings.require_image())
    truncated = cache.blob_path(manifest.blobs[manifest.images[app].layers[-1]])
    truncated.write_bytes(truncated.read_bytes()[:-10])
    wipe_like_a_fresh_machine(engine, settings)
    lines: list[str] = []

    report = load_images(engine, cache, log=lines.append)

    assert app in report.failed
    assert any(truncated.name in line for line in lines)

    cache.manifest_path.write_text("PK\x03\x04 this is a zip, not our manifest")
    lines.clear()
    foreign = load_images(engine, cache, log=lines.append)
    assert foreign.restored == []
    assert any("manifest.json" in line and "warning" in line for line in lines)


def test_missing_cache_is_a_cold_build(engine: Engine, tmp_path: Path) -> None:
    lines: list[str] = []
    report = load_images(engine, CacheDir(tmp_path / "nothing"), log=lines.append)
    assert report.cold
    assert lines == [f"no cache at {tmp_path / 'nothing'}: this is a cold build"]


def test_killed_save_leaves_the_previous_cache_intact(engine: Engine, saved: Saved) -> None:
    settings, cache = saved.settings, saved.cache
    tmp_path = settings.project_dir
    previous = cache.manifest_path.read_bytes()
    # A new app image with a big incompressible layer, so the save takes a while.
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(
        dockerfile.read_text() + "RUN head -c 400000000 /dev/urandom > /app/big\n"
    )
    build(engine, settings, "legacy")
    save = subprocess.Popen(
        [sys.executable, "-c", SAVE_SCRIPT, str(cache.root), *images_to_cache(settings)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not list((cache.root / "blobs").glob(".tmp-*")):
            assert save.poll() is None, "save ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        save.send_signal(signal.SIGKILL)
    finally:
        save.wait()

    assert cache.manifest_path.read_bytes() == previous
    wipe_like_a_fresh_machine(engine, settings)
    report = load_images(engine, cache, log=quiet)
    assert report.failed == []
    assert len(report.restored) == 3  # the base of its own, the stage and the app
    # The next save clears what the killed one left behind.
    save_images(engine, cache, images_to_cache(settings), log=quiet)
    assert not list((cache.root / "blobs").glob(".tmp-*"))
