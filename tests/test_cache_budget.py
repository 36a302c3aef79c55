"""LAYERKEEP_CACHE_MAX_MB and cache.status on a real folder cache, saved from the engine.

Images are imported from random bytes (incompressible: a megabyte of content is a
megabyte on disk), so the sizes the budget sees are the sizes the test chose.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from layerkeep.building.cache_mounts import CacheMount
from layerkeep.cache.backend import SaveOutcome
from layerkeep.cache.budget import MB, BudgetReport, folder_size, keep_within_budget, plan_budget
from layerkeep.cache.layer_load import load_images
from layerkeep.cache.layer_save import save_images
from layerkeep.cache.mount_folder import MountStore
from layerkeep.cache.mount_store import MountsReport
from layerkeep.cache.status import dir_status, status_lines
from layerkeep.cache.store import CacheDir
from layerkeep.cache.upkeep import after_load, after_save
from layerkeep.cache.usage import FILE as USAGE_FILE
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.settings import Settings, load_settings

pytestmark = pytest.mark.docker


def quiet(_: str) -> None:
    pass


def random_image(engine: Engine, reference: str, megabytes: float) -> str:
    """An image of one layer holding ``megabytes`` of random bytes, tagged ``reference``
    (the image it replaces is removed); its id."""
    data = os.urandom(int(megabytes * MB))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("data.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    old = engine.image_id(reference)
    image_id = engine.import_image(iter([buffer.getvalue()]), reference=reference, changes=[])
    engine.tag_image(image_id, reference)
    if old and old != image_id:
        engine.remove_image(old, force=True)
    return image_id


def keep_mount(cache_dir: Path, mount_id: str, megabytes: float) -> None:
    """A cache mount of ``megabytes`` random bytes, kept as cache.save keeps one."""
    tar = cache_dir.parent / f"{mount_id}.tar"
    tar.write_bytes(os.urandom(int(megabytes * MB)))
    digest = "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
    mount = CacheMount(mount_id, f"/cache/{mount_id}", "base")
    MountStore(cache_dir).keep(mount, tar, digest, tar.stat().st_size, level=1)
    tar.unlink()


def folder_settings(project: Path, cache_dir: Path, **extra: str) -> Settings:
    environ = {
        "LAYERKEEP_IMAGE": "team/app",
        "LAYERKEEP_CACHE_DIR": str(cache_dir),
        "LAYERKEEP_BUILD_ID": "job-1",
        **{f"LAYERKEEP_{key.upper()}": value for key, value in extra.items()},
    }
    return load_settings(project, environ, git_facts=lambda _: GitFacts("", ""))


def save(engine: Engine, settings: Settings, images: list[str], lines: list[str]) -> SaveOutcome:
    report = save_images(engine, CacheDir(settings.cache_dir), images, level=1, log=quiet)
    outcome = SaveOutcome(report)
    after_save(settings, outcome, MountsReport(), log=lines.append)
    return outcome


def test_the_budget_holds_over_ten_saves_of_a_growing_image(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    settings = folder_settings(tmp_path, cache_dir, cache_max_mb="30")
    app, service = f"{unique_repository}/app:latest", f"{unique_repository}/db:15"
    random_image(engine, service, 8)
    keep_mount(cache_dir, "pip", 4)
    keep_mount(cache_dir, "npm", 4)
    lines: list[str] = []
    sizes, dropped = [], []
    for save_number in range(1, 11):
        random_image(engine, app, 2 * save_number)  # 2, 4, ... 20 MB
        lines.clear()
        outcome = save(engine, settings, [app, service], lines)
        sizes.append(folder_size(cache_dir))
        held = CacheDir(cache_dir).read_manifest().images
        assert app in outcome.images.saved
        assert app in held  # never what the save wrote
        dropped.append([line for line in lines if "LAYERKEEP_CACHE_MAX_MB" in line])
    assert max(sizes) <= 30 * MB
    # 2n MB of app, 8 of the service, 8 of mounts: past 30 MB at the 7th and 9th saves.
    # The mounts were used least recently (the service is used by every save).
    assert [n + 1 for n, went in enumerate(dropped) if went] == [7, 9]
    assert dropped[6][0].startswith(
        "cache folder past LAYERKEEP_CACHE_MAX_MB=30 (30.0 MB): dropped cache mount pip, "
        "used least recently (4.0 MB freed, 26.0 MB now)"
    )
    assert "dropped cache mount npm" in dropped[8][0]
    assert MountStore(cache_dir).read_index() == {}
    assert set(CacheDir(cache_dir).read_manifest().images) == {app, service}


def test_an_image_used_less_recently_than_a_mount_goes_first_and_the_save_stays(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    app, old = f"{unique_repository}/app:latest", f"{unique_repository}/old:1"
    random_image(engine, app, 3)
    random_image(engine, old, 5)
    # The save before kept `old` (LAYERKEEP_CACHE_IMAGES named it then).
    save(engine, folder_settings(tmp_path, cache_dir), [app, old], [])
    keep_mount(cache_dir, "pip", 2)  # kept after that save: used more recently
    random_image(engine, app, 4)
    lines: list[str] = []
    outcome = save_images(
        engine, CacheDir(cache_dir), [app], level=1, keep=[old], log=quiet
    )
    after_save(
        folder_settings(tmp_path, cache_dir, cache_max_mb="8"), SaveOutcome(outcome),
        MountsReport(), log=lines.append,
    )
    assert set(CacheDir(cache_dir).read_manifest().images) == {app}
    assert list(MountStore(cache_dir).read_index()) == ["pip"]
    assert folder_size(cache_dir) <= 8 * MB
    assert [line for line in lines if "MAX_MB" in line] == [
        line for line in lines if f"dropped image {old}, used least recently" in line
    ]


def test_a_save_bigger_than_the_budget_is_kept_and_says_so(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    app, service = f"{unique_repository}/app:latest", f"{unique_repository}/db:15"
    random_image(engine, app, 6)
    random_image(engine, service, 3)
    keep_mount(cache_dir, "pip", 1)
    lines: list[str] = []
    save(engine, folder_settings(tmp_path, cache_dir, cache_max_mb="5"), [app, service], lines)
    budget = [line for line in lines if "MAX_MB" in line]
    assert len(budget) == 1
    assert budget[0].endswith("still past it: what this save wrote (9.0 MB) is more than "
                              "the budget")
    assert set(CacheDir(cache_dir).read_manifest().images) == {app, service}
    assert MountStore(cache_dir).read_index() == {}


def test_prune_plan_names_what_would_go_and_changes_nothing(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    app = f"{unique_repository}/app:latest"
    random_image(engine, app, 4)
    keep_mount(cache_dir, "pip", 3)
    save(engine, folder_settings(tmp_path, cache_dir), [app], [])
    before = sorted((p.name, p.stat().st_size) for p in cache_dir.rglob("*") if p.is_file())
    plan = plan_budget(cache_dir, 5 * MB)
    assert plan[0].startswith("would drop mount pip (3.0 MB, last used ")
    assert plan[-1] == "the cache folder would then hold about 4.0 MB of 5 MB allowed"
    assert sorted((p.name, p.stat().st_size) for p in cache_dir.rglob("*") if p.is_file()) == before


def test_status_shows_the_last_restore_and_a_read_only_job_writes_nothing(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    app, service = f"{unique_repository}/app:latest", f"{unique_repository}/db:15"
    random_image(engine, app, 2)
    random_image(engine, service, 1)
    save(engine, folder_settings(tmp_path, cache_dir, build_id="save-job"), [app, service], [])
    keep_mount(cache_dir, "pip", 1)

    engine.remove_image(app, force=True)
    restore = folder_settings(tmp_path, cache_dir, build_id="pr-17", cache_read_only="yes")
    loaded = load_images(engine, CacheDir(cache_dir), log=quiet)
    assert loaded.restored == [app]
    usage_before = (cache_dir / USAGE_FILE).read_bytes()
    assert not after_load(restore, loaded, MountsReport(), log=quiet)
    assert (cache_dir / USAGE_FILE).read_bytes() == usage_before

    restore = folder_settings(tmp_path, cache_dir, build_id="job-42")
    assert after_load(restore, loaded, MountsReport(restored=["pip"]), log=quiet)
    status = dir_status(cache_dir, max_mb=100)
    assert status["last_restored"]["build_id"] == "job-42"
    assert sorted(status["last_restored"]["items"]) == sorted(
        [f"image:{app}", f"image:{service}", "mount:pip"]
    )
    assert status["last_saved"]["build_id"] == "save-job"
    images = {row["tag"]: row for row in status["images"]}
    assert images[app]["layers"] == 1
    assert 2 * MB < images[app]["bytes"] == images[app]["unique_bytes"] < 2.1 * MB
    assert [m["id"] for m in status["mounts"]] == ["pip"]
    assert status["bytes"] == folder_size(cache_dir)
    table = status_lines(status)
    assert table[0].startswith(f"cache folder {cache_dir}: ")
    assert "of 100 MB allowed" in table[0]
    assert table[2].endswith("UTC by build job-42")
    assert json.loads(json.dumps(status)) == status  # what --json prints


def test_the_budget_waits_for_the_cache_folders_lock(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    """A job reading the folder holds its lock: nothing is dropped until it lets go."""
    cache_dir = tmp_path / "cache"
    app = f"{unique_repository}/app:latest"
    random_image(engine, app, 1)
    keep_mount(cache_dir, "pip", 3)
    save(engine, folder_settings(tmp_path, cache_dir), [app], [])
    index_before = MountStore(cache_dir).read_index()
    done: list[BudgetReport] = []
    with CacheDir(cache_dir).locked(write=False):  # as load_images holds it
        worker = threading.Thread(target=lambda: done.append(keep_within_budget(
            cache_dir, 2 * MB, written_images=(), written_mounts=(), log=quiet
        )))
        worker.start()
        worker.join(timeout=3)  # long enough to finish, were it not waiting
        assert worker.is_alive()
        assert MountStore(cache_dir).read_index() == index_before
    worker.join()
    assert done[0].mounts == ["pip"]
    assert MountStore(cache_dir).read_index() == {}
