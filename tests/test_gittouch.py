"""gittouch against git's own answer (`git log -1 -- FILE`) on real repositories."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from gitrepos import AUTHOR_LAG, SPECIAL_NAMES, Scripted, git, oracle_times, random_history

from layerkeep.core.errors import GitError
from layerkeep.git.touch import last_change_times, touch

T0 = 1_600_000_000
LINES = "".join(f"line {number}\n" for number in range(20))


@pytest.fixture(autouse=True)
def _no_user_git_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The code under test runs git too: keep this machine's config out of it."""
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)


def build_scenario(path: Path) -> dict[str, int]:
    """Every case the brief names, built with porcelain; returns the expected committer
    time of the files whose answer is not obvious."""
    repo = Scripted(path)
    for name in [
        "both.txt", "conflict.txt", "same.txt", "ours.txt", "untouched.txt", "to-link",
        "old name.txt", "gone.txt", "dir/sub/deep.txt", "octo1", "octo2", "octo3", "octo-all",
    ]:  # fmt: skip
        repo.write(name, LINES if name == "both.txt" else f"{name}\n")
    repo.write("mode.sh", "#!/bin/sh\n")
    repo.write("mode-in-merge.sh", "#!/bin/sh\n")
    for name in SPECIAL_NAMES:
        repo.write(name, f"{name}\n")
    repo.symlink("link", "untouched.txt")
    repo.commit("root", when=T0)
    repo.git("branch", "side")

    # Both sides edit: one file in different places, one in the same line (a conflict),
    # one identically (the change reaches HEAD through both parents).
    repo.write("both.txt", LINES.replace("line 1\n", "line 1 main\n"))
    repo.write("conflict.txt", "main\n")
    repo.write("same.txt", "same change\n")
    repo.write("with space.txt", "main edit\n")
    main1 = T0 + 1000
    repo.commit("main edits", when=main1)
    repo.git("checkout", "-q", "side")
    repo.write("both.txt", LINES.replace("line 18\n", "line 18 side\n"))
    repo.write("conflict.txt", "side\n")
    repo.write("same.txt", "same change\n")
    repo.write("dir/sub/deep.txt", "deep side\n")
    repo.write("ünïcødé/naïve.txt", "side\n")
    side1 = T0 + 2000
    repo.commit("side edits", when=side1)
    repo.write("tab\there", "side\n")
    side2 = T0 + 500  # clock skew: older than its parent
    repo.commit("skewed side commit", when=side2)
    repo.git("checkout", "-q", "main")
    merge1 = T0 + 1500  # older than the side commits it merges
    repo.merge("side", when=merge1, resolve={"conflict.txt": "resolved by hand\n"})

    # A side branch dropped by `merge -s ours`: its change never reaches HEAD.
    repo.git("checkout", "-q", "-b", "dropped")
    repo.write("ours.txt", "dropped\n")
    repo.commit("dropped change", when=T0 + 3000)
    repo.git("checkout", "-q", "main")
    repo.merge("dropped", when=T0 + 3100, strategy="ours")

    # An octopus: each file comes from one of three branches.
    for number in (1, 2, 3):
        repo.git("checkout", "-q", "-b", f"o{number}", "main")
        repo.write(f"octo{number}", f"octo{number} changed\n")
        repo.commit(f"octo {number}", when=T0 + 4000 + number)
    repo.git("checkout", "-q", "main")
    repo.merge("o1", "o2", "o3", when=T0 + 4100)

    # An octopus whose result differs from every parent: by content, and by mode only.
    for number in (1, 2):
        repo.git("checkout", "-q", "-b", f"q{number}", "main")
        repo.write(f"octo{number}", f"octo{number} again\n")
        repo.commit(f"q {number}", when=T0 + 4200 + number)
    repo.git("checkout", "-q", "main")
    repo.git("merge", "-q", "--no-commit", "--no-ff", "q1", "q2")
    repo.write("octo-all", "made in the merge\n")
    repo.write("mode-in-merge.sh", "#!/bin/sh\n", executable=True)
    octopus = T0 + 4300
    repo.commit("octopus with changes of its own", when=octopus)

    repo.write("mode.sh", "#!/bin/sh\n", executable=True)
    chmod = T0 + 5000
    repo.commit("chmod only", when=chmod)
    repo.git("mv", "old name.txt", "new name.txt")
    renamed = T0 + 6000
    repo.commit("rename", when=renamed)

    # Deleted, then added back (same content) on a branch merged later.
    repo.remove("gone.txt")
    repo.commit("delete", when=T0 + 7000)
    repo.git("checkout", "-q", "-b", "readd")
    repo.write("gone.txt", "gone.txt\n")
    readded = T0 + 7100
    repo.commit("add back", when=readded)
    repo.git("checkout", "-q", "main")
    repo.write("octo3", "octo3 on main\n")
    repo.commit("unrelated", when=T0 + 7150)
    repo.merge("readd", when=T0 + 7200)

    repo.symlink("to-link", "untouched.txt")  # a file becomes a symlink
    repo.symlink("link", "both.txt")  # a symlink changes target
    linked = T0 + 8000
    repo.commit("links", when=linked)
    for name in SPECIAL_NAMES[::2]:
        repo.write(name, f"{name} last\n")
    last = T0 + 9000
    repo.commit("special names", when=last)
    return {
        "untouched.txt": T0,
        "ours.txt": T0,
        "both.txt": merge1,
        "conflict.txt": merge1,
        "same.txt": main1,
        "dir/sub/deep.txt": side1,
        "ünïcødé/naïve.txt": side1 if SPECIAL_NAMES.index("ünïcødé/naïve.txt") % 2 else last,
        "tab\there": side2 if SPECIAL_NAMES.index("tab\there") % 2 else last,
        "octo1": T0 + 4201,  # the octopus took q1's version
        "octo2": T0 + 4202,
        "octo3": T0 + 7150,
        "octo-all": octopus,
        "mode-in-merge.sh": octopus,
        "mode.sh": chmod,
        "new name.txt": renamed,
        "gone.txt": readded,
        "to-link": linked,
        "link": linked,
    }


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("scenario") / "repo"
    return path, build_scenario(path)


@pytest.mark.parametrize("author_time", [False, True], ids=["committer", "author"])
def test_scenario_matches_git_log_for_every_file(
    scenario: tuple[Path, dict[str, int]], author_time: bool
) -> None:
    path, expected = scenario
    oracle = oracle_times(path, author_time=author_time)
    lag = AUTHOR_LAG if author_time else 0
    assert {name: oracle[name] for name in expected} == {
        name: when - lag for name, when in expected.items()
    }, "the scenario no longer builds what it means to"
    assert last_change_times(path, author_time=author_time) == oracle


def test_octopus_of_branch_commits_follows_each_file_to_its_branch(tmp_path: Path) -> None:
    repo = Scripted(tmp_path / "repo")
    for number in (1, 2, 3):
        repo.write(f"f{number}", "base\n")
    repo.commit("root", when=T0)
    for number in (1, 2, 3):
        repo.git("checkout", "-q", "-b", f"b{number}", "main")
        repo.write(f"f{number}", "changed\n")
        repo.commit(f"b{number}", when=T0 + 100 * number)
    repo.git("checkout", "-q", "main")
    repo.merge("b1", "b2", "b3", when=T0 + 1000)
    expected = {"f1": T0 + 100, "f2": T0 + 200, "f3": T0 + 300}
    assert oracle_times(repo.path) == expected
    assert last_change_times(repo.path) == expected


def test_files_and_folders_swapping_names(tmp_path: Path) -> None:
    repo = Scripted(tmp_path / "repo")
    repo.write("was-file", "file\n")
    repo.write("was-folder/inside", "inside\n")
    repo.write("keeps/inside", "inside\n")
    repo.commit("root", when=T0)
    (repo.path / "was-file").unlink()
    repo.write("was-file/now-inside", "inside\n")
    repo.commit("file to folder", when=T0 + 100)
    repo.write("was-folder/inside", "changed while a folder\n")
    repo.commit("edit in folder", when=T0 + 200)
    shutil.rmtree(repo.path / "was-folder")
    repo.write("was-folder", "now a file\n")
    repo.commit("folder to file", when=T0 + 300)
    expected = {"was-file/now-inside": T0 + 100, "was-folder": T0 + 300, "keeps/inside": T0}
    assert oracle_times(repo.path) == expected
    assert last_change_times(repo.path) == expected


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_random_histories_agree_with_git_log(tmp_path: Path, seed: int) -> None:
    random_history(tmp_path / "repo", seed=seed, commits=200, files=50)
    for author_time in (False, True):
        oracle = oracle_times(tmp_path / "repo", author_time=author_time)
        ours = last_change_times(tmp_path / "repo", author_time=author_time)
        assert len(oracle) > 15
        disagree = {path: (ours.get(path), when) for path, when in oracle.items()}
        assert {path: pair for path, pair in disagree.items() if pair[0] != pair[1]} == {}
        assert ours.keys() == oracle.keys()


def test_touch_sets_mtimes_and_leaves_dirty_files_alone(
    scenario: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path = tmp_path / "repo"
    shutil.copytree(scenario[0], path, symlinks=True)
    (path / "both.txt").write_text("edited, not committed\n")
    (path / "same.txt").write_text("staged\n")
    git(path, "add", "same.txt")
    (path / "untouched.txt").unlink()
    for name in ("both.txt", "same.txt"):
        os.utime(path / name, ns=(123, 123))
    oracle = oracle_times(path)

    report = touch(path)

    dirty = {"both.txt", "same.txt", "untouched.txt"}
    assert report.skipped_dirty == tuple(sorted(dirty))
    assert report.touched == len(oracle) - len(dirty)
    assert not report.shallow
    assert report.commits_read > 10
    for name, when in oracle.items():
        if name not in dirty:
            assert os.lstat(path / name).st_mtime_ns == when * 10**9, name
    # "link" points at both.txt: touching the link must not date what it points at.
    assert (path / "link").readlink() == Path("both.txt")
    assert os.lstat(path / "both.txt").st_mtime_ns == 123
    assert os.lstat(path / "same.txt").st_mtime_ns == 123
    # "to-link" points at the deleted untouched.txt: a dangling link is dated too.
    assert os.lstat(path / "to-link").st_mtime_ns == oracle["to-link"] * 10**9


def test_touch_with_author_time(scenario: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    path = tmp_path / "repo"
    shutil.copytree(scenario[0], path, symlinks=True)
    touch(path, author_time=True)
    for name, when in oracle_times(path, author_time=True).items():
        assert os.lstat(path / name).st_mtime_ns == when * 10**9, name


def test_subfolder_dates_the_whole_work_tree(scenario: tuple[Path, dict[str, int]]) -> None:
    path, expected = scenario
    times = last_change_times(path / "dir" / "sub")
    assert times["dir/sub/deep.txt"] == expected["dir/sub/deep.txt"]
    assert times["untouched.txt"] == T0


def test_stops_reading_once_every_file_is_dated(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    random_history(path, seed=5)
    for name in git(path, "ls-files", "-z").split("\0"):
        if name:
            file = path / name
            file.unlink()
            file.write_text("rewritten\n")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "everything", when=T0 + 10**8)
    report = touch(path)
    assert report.commits_read == 1
    assert set(last_change_times(path).values()) == {T0 + 10**8}


def test_shallow_clone_is_reported_and_dated_at_the_boundary(
    scenario: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--depth", "3", f"file://{scenario[0]}", str(clone))
    assert last_change_times(clone) == oracle_times(clone)
    report = touch(clone)
    assert report.shallow
    assert min(last_change_times(clone).values()) > T0


def test_gitlinks_are_dated_but_not_touched(tmp_path: Path) -> None:
    repo = Scripted(tmp_path / "repo")
    repo.write("file", "x\n")
    root = repo.commit("root", when=T0)
    repo.git("update-index", "--add", "--cacheinfo", f"160000,{root},sub")
    repo.git("commit", "-q", "-m", "submodule", when=T0 + 50)
    (repo.path / "sub").mkdir()
    os.utime(repo.path / "sub", ns=(7, 7))
    assert last_change_times(repo.path) == oracle_times(repo.path) == {"file": T0, "sub": T0 + 50}
    report = touch(repo.path)
    assert report.touched == 1
    assert os.lstat(repo.path / "sub").st_mtime_ns == 7


def test_outside_a_repository_is_a_clear_error(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    folder.mkdir()
    with pytest.raises(GitError, match="plain is not inside a git work tree"):
        touch(folder)
    with pytest.raises(GitError, match="missing is not a folder"):
        last_change_times(tmp_path / "missing")


def test_empty_repository_is_a_clear_error(tmp_path: Path) -> None:
    git(tmp_path, "init", "-q", "empty")
    with pytest.raises(GitError, match="has no commits yet"):
        touch(tmp_path / "empty")


def test_missing_git_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GitError, match="git is not installed"):
        touch(tmp_path)


def git_folder(repo: Path) -> dict[str, tuple[bytes, int]]:
    """Every file in ``repo``'s .git (relative path): its bytes and mtime."""
    folder = repo / ".git"
    files = (path for path in folder.rglob("*") if path.is_file())
    return {
        path.relative_to(folder).as_posix(): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in files
    }


def changed_since(before: dict[str, tuple[bytes, int]], repo: Path) -> set[str]:
    """Files of ``repo``'s .git added, removed, rewritten or touched since ``before``."""
    after = git_folder(repo)
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


def test_touch_never_writes_the_git_folder(tmp_path: Path) -> None:
    """With .git in a build context, a rewritten .git/index makes `COPY .` miss."""
    repo = Scripted(tmp_path / "origin")
    for number in range(30):
        repo.write(f"src/file{number}.py", f"{number}\n")
    repo.commit("root", when=T0)
    repo.write("src/file3.py", "changed\n")
    repo.commit("change", when=T0 + 100)
    clone = tmp_path / "clone"  # what a CI job checks out
    git(tmp_path, "clone", "-q", f"file://{repo.path}", str(clone))
    (clone / "src" / "file5.py").write_text("edited, not committed\n")
    before = git_folder(clone)
    assert "index" in before

    first = touch(clone)
    assert changed_since(before, clone) == set()
    rerun = touch(clone)  # the same checkout again (a retried job): the index's stat data
    assert changed_since(before, clone) == set()  # no longer matches any file's mtime

    assert first.skipped_dirty == rerun.skipped_dirty == ("src/file5.py",)
    assert first.touched == rerun.touched == 29
    assert os.lstat(clone / "src" / "file3.py").st_mtime_ns == (T0 + 100) * 10**9
