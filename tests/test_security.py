"""What another local user, a damaged cache or a careless setting must not achieve.

Each test puts the attack or the mistake in place for real (another user's folder, a
symlink, a manifest naming ``../``, a secret in a build arg) and checks that layerkeep
refuses it with one line, or never writes, reads or leaks what it must not.
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from clean_env import clean_environ

from layerkeep.cache.store import CacheDir, CacheUnavailable
from layerkeep.core import joblock
from layerkeep.core.joblock import UnsafeLockFolder, hold_build_id

NOBODY = 65534
VICTIM_TEXT = "the victim's own content\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown to another user")


def victim(tmp_path: Path) -> Path:
    """A file of the test's own that a lock must never write."""
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def lock_name(build_id: str) -> str:
    return f"{joblock._key('e', 'p', build_id)}.lock"  # noqa: SLF001: the name an attacker plants


# --- locks ------------------------------------------------------------------------------


@needs_root
def test_a_lock_folder_another_user_made_first_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    planted = tmp_path / "locks"
    planted.mkdir()
    (planted / lock_name("42")).symlink_to(target)
    os.chown(planted, NOBODY, NOBODY)
    planted.chmod(0o1777)

    with pytest.raises(UnsafeLockFolder, match=f"belongs to uid {NOBODY}") as refused:
        hold_build_id("e", "p", "42", configured=True, command="inv ci", folder=planted)

    assert str(planted) in refused.value.one_line()
    assert "\n" not in refused.value.one_line()
    assert target.read_text() == VICTIM_TEXT
    assert stat.S_IMODE(planted.stat().st_mode) == 0o1777  # not ours to change


def test_a_lock_folder_others_may_write_or_a_symlink_is_refused(tmp_path: Path) -> None:
    target = victim(tmp_path)
    open_folder = tmp_path / "open"
    open_folder.mkdir()
    open_folder.chmod(0o777)
    (open_folder / lock_name("42")).symlink_to(target)
    with pytest.raises(UnsafeLockFolder, match="may be written by others"):
        hold_build_id("e", "p", "42", configured=True, command="", folder=open_folder)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    linked = tmp_path / "linked"
    linked.symlink_to(elsewhere)
    with pytest.raises(UnsafeLockFolder, match="is a symlink"):
        hold_build_id("e", "p", "42", configured=True, command="", folder=linked)

    assert list(elsewhere.iterdir()) == []
    assert target.read_text() == VICTIM_TEXT


def test_a_symlink_in_the_lock_folder_is_not_followed(tmp_path: Path) -> None:
    target = victim(tmp_path)
    folder = tmp_path / "locks"
    folder.mkdir(mode=0o700)
    (folder / lock_name("42")).symlink_to(target)

    with pytest.raises(UnsafeLockFolder, match="cannot be a lock file"):
        hold_build_id("e", "p", "42", configured=True, command="inv ci", folder=folder)

    assert target.read_text() == VICTIM_TEXT


def test_the_lock_folder_is_private_and_a_released_lock_leaves_no_file(tmp_path: Path) -> None:
    folder = tmp_path / "made" / "locks"
    lock = hold_build_id("e", "p", "42", configured=True, command="inv ci", folder=folder)
    info = folder.lstat()
    assert stat.S_ISDIR(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.geteuid()
    assert lock.path.read_text().startswith(f"pid {os.getpid()} (inv ci")

    lock.release()

    assert list(folder.iterdir()) == []


def test_a_lock_removed_between_open_and_flock_is_taken_afresh(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of removing lock files: a job that opened the file just before its holder
    removed it, and locks it just after, must not believe it holds the build id. That
    moment cannot be hit on demand, so the holder is released inside a wrapper around
    the real ``flock``, between the second job's open and its lock."""
    folder = tmp_path / "locks"
    first = hold_build_id("e", "p", "42", configured=True, command="first", folder=folder)
    real_flock = fcntl.flock

    def release_first_then_lock(handle: int, operation: int) -> None:
        if not first.handle.closed:
            first.release()
        real_flock(handle, operation)

    monkeypatch.setattr(fcntl, "flock", release_first_then_lock)
    second = hold_build_id("e", "p", "42", configured=True, command="second", folder=folder)
    monkeypatch.undo()
    try:
        assert first.handle.closed
        assert os.fstat(second.handle.fileno()).st_ino == second.path.stat().st_ino
        with pytest.raises(joblock.BuildIdInUse, match="second"):
            hold_build_id("e", "p", "42", configured=True, command="third", folder=folder)
    finally:
        second.release()
    assert list(folder.iterdir()) == []


RUN_PROJECT = """\
import os
from pathlib import Path

from invoke.collection import Collection

from layerkeep.tasks.graph import step


@step("work")
def work(c):
    locks = Path(os.environ["LOCKS"])
    seen = [path.read_text() for path in locks.iterdir()]
    Path(os.environ["SEEN"]).write_text("\\n".join(seen))
    return "done"


ns = Collection(work)
"""


def test_a_run_keeps_its_lock_in_the_private_folder_and_removes_it(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "tasks.py").write_text(RUN_PROJECT)
    temp = tmp_path / "tmp"
    temp.mkdir()
    locks = temp / f"layerkeep-locks-{os.geteuid()}"
    seen = tmp_path / "seen"

    done = subprocess.run(
        [sys.executable, "-m", "invoke", "work"], cwd=project, capture_output=True, text=True,
        env=clean_environ(TMPDIR=str(temp), LOCKS=str(locks), SEEN=str(seen)),
        check=False, timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert seen.read_text().startswith("pid ")  # the run's lock, while it ran
    assert "(" in seen.read_text()
    assert stat.S_IMODE(locks.lstat().st_mode) == 0o700
    assert list(locks.iterdir()) == []


def test_the_cache_folders_lock_is_never_opened_through_a_symlink(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    planted = tmp_path / "would-be-created"
    (cache / ".lock").symlink_to(planted)

    for write in (True, False):
        with (
            pytest.raises(CacheUnavailable, match=r"\.lock is a symlink"),
            CacheDir(cache).locked(write=write),
        ):
            pass

    assert not planted.exists()
