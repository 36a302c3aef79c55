"""What another local user, a damaged cache or a careless setting must not achieve.

Each test puts the attack or the mistake in place for real (another user's folder, a
symlink, a manifest naming ``../``, a secret in a build arg) and checks that layerkeep
refuses it with one line, or never writes, reads or leaks what it must not.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from clean_env import clean_environ

from layerkeep.cache.store import CacheDir, CacheUnavailable
from layerkeep.core import joblock
from layerkeep.core.engine import Engine
from layerkeep.core.job import Job
from layerkeep.core.joblock import UnsafeLockFolder, hold_build_id
from layerkeep.core.settings import load_settings
from layerkeep.testing.testrun import MANIFEST, CaseCounts, run_tests

NOBODY = 65534
VICTIM_TEXT = "the victim's own content\n"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown to another user")


def victim(tmp_path: Path) -> Path:
    """A file of the test's own that a lock must never write."""
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def lock_name(build_id: str) -> str:
    # The very name a job would lock: what an attacker plants.
    return f"{joblock._key('e', 'p', build_id)}.lock"


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


# --- the reports folder -------------------------------------------------------------------

JUNIT = '<testsuite tests="2"><testcase name="a"/><testcase name="b"/></testsuite>'
# What a test run may leave: JUnit at the top and in a folder of its own, its uid, and a
# link into the host (which must not come out).
WRITES_REPORTS = (
    "id -u > /reports/uid.txt && mkdir /reports/sub"
    f" && echo '{JUNIT}' > /reports/junit.xml && cp /reports/junit.xml /reports/sub/"
    " && ln -s /etc/hostname /reports/link.xml"
)


def non_root_image(repository: str) -> str:
    """The python stand-in run as a uid the host does not know, as many images are."""
    image = f"{repository}/app:latest"
    subprocess.run(
        ["docker", "build", "-q", "-t", image, "-"], input="FROM python:3.11-slim\nUSER 10001\n",
        text=True, capture_output=True, check=True, timeout=120,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    return image


@pytest.mark.docker
def test_a_user_made_reports_folder_keeps_its_mode_and_gets_the_reports(
    engine: Engine, tmp_path: Path, unique_repository: str
) -> None:
    image = non_root_image(unique_repository)
    reports = tmp_path / "reports"
    reports.mkdir()
    reports.chmod(0o750)
    (reports / "mine.txt").write_text("the user's own file\n")
    settings = load_settings(
        tmp_path,
        {
            "LAYERKEEP_IMAGE": image, "LAYERKEEP_PROJECT": "security-test",
            "LAYERKEEP_BUILD_ID": uuid.uuid4().hex[:10], "LAYERKEEP_REPORTS_DIR": "reports",
            "LAYERKEEP_TEST_COMMAND": WRITES_REPORTS,
            "LAYERKEEP_COMMIT": "abc", "LAYERKEEP_BRANCH": "main",
        },
    )
    lines: list[str] = []

    done = run_tests(engine.for_job(Job.from_settings(settings)), settings, log=lines.append)

    assert done.exit_code == 0, lines
    assert stat.S_IMODE(reports.stat().st_mode) == 0o750
    assert (reports / "uid.txt").read_text() == "10001\n"
    assert done.reports == (reports / "junit.xml", reports / "sub" / "junit.xml")
    assert done.counts == CaseCounts(passed=4)
    assert "warning: link.xml is not a regular file; left out" in lines
    assert sorted(path.name for path in reports.iterdir()) == [
        MANIFEST, "junit.xml", "mine.txt", "sub", "uid.txt"
    ]
    assert (reports / "mine.txt").read_text() == "the user's own file\n"


MOVE_AS_USER = """
import sys
from pathlib import Path
from layerkeep.testing.testrun import move_reports
lines = []
moved = move_reports(Path(sys.argv[1]), Path(sys.argv[2]), lines.append)
print("\\n".join(map(str, moved + lines)))
"""


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder other users can reach (the test's own tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="layerkeep-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@needs_root
def test_reports_in_a_folder_the_container_made_as_its_user_are_copied(
    shared_folder: Path,
) -> None:
    """A user who is not root may not move files out of a folder the container made as
    its own uid: such reports are copied, and become the user's (removable later). A
    folder the user cannot read is a warning, not a silent loss."""
    work = shared_folder / "work"
    outbox, reports = work / "outbox", work / "reports"
    (outbox / "sub").mkdir(parents=True)
    (outbox / "closed").mkdir(mode=0o700)
    reports.mkdir()
    (outbox / "top.xml").write_text(JUNIT)
    (outbox / "sub" / "junit.xml").write_text(JUNIT)
    for path in (work, outbox, reports):
        os.chown(path, NOBODY, NOBODY)
    outbox.chmod(0o777)
    for path in (outbox / "top.xml", outbox / "sub", outbox / "sub" / "junit.xml"):
        os.chown(path, 10001, 10001)
    os.chown(outbox / "closed", 10001, 10001)

    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         sys.executable, "-c", MOVE_AS_USER, str(outbox), str(reports)],
        capture_output=True, text=True, check=True, timeout=60,
    )

    assert done.stdout.splitlines() == [
        str(reports / "sub" / "junit.xml"),
        str(reports / "top.xml"),
        f"warning: reports in {outbox / 'closed'} not read: Permission denied",
    ]
    assert (reports / "sub" / "junit.xml").read_text() == JUNIT
    assert (reports / "sub" / "junit.xml").stat().st_uid == NOBODY  # copied: the user's
    assert (reports / "top.xml").stat().st_uid == 10001  # moved
    assert not (outbox / "top.xml").exists()
