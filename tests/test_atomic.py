"""atomic_write: the whole new file or the old one, with the mode asked for, and no
temporary file left behind whatever fails."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerkeep.core.atomic import atomic_write
from layerkeep.core.outcome import write_report


def names(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


class HalfWay(Exception):
    """What the pieces below raise once some were written."""


def pieces_then_failure() -> Iterator[bytes]:
    yield b"new first half, "
    raise HalfWay


@pytest.fixture
def strict_umask() -> Iterator[None]:
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("strict_umask")
@pytest.mark.parametrize("mode", [0o644, 0o600, 0o640])
def test_the_file_gets_the_mode_asked_for_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "file"
    atomic_write(target, b"content", mode=mode)
    assert stat.S_IMODE(target.stat().st_mode) == mode
    # Replacing a file gives it the mode asked for, not the old file's.
    atomic_write(target, b"content", mode=0o604)
    assert stat.S_IMODE(target.stat().st_mode) == 0o604


def test_pieces_are_written_in_order_into_a_new_folder(tmp_path: Path) -> None:
    target = tmp_path / "new" / "folder" / "file"
    atomic_write(target, iter([b"one ", b"two ", b"three"]), mode=0o644)
    assert target.read_bytes() == b"one two three"
    assert names(target.parent) == ["file"]


def test_a_write_failing_half_way_leaves_the_previous_file_and_no_temporary(
    tmp_path: Path,
) -> None:
    target = tmp_path / "manifest.json"
    target.write_bytes(b"the previous content")
    with pytest.raises(HalfWay):
        atomic_write(target, pieces_then_failure(), mode=0o644)
    assert target.read_bytes() == b"the previous content"
    assert names(tmp_path) == ["manifest.json"]


def test_a_rename_that_fails_leaves_no_temporary(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    (taken / "inside").mkdir(parents=True)  # a folder that is not empty: no file replaces it
    with pytest.raises(OSError, match="Is a directory"):
        atomic_write(taken, b"content", mode=0o644)
    assert names(tmp_path) == ["taken"]
    assert names(taken) == ["inside"]


def test_the_file_then_the_folder_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Durability cannot be seen without a crash: record what is fsynced, and when.
    synced: list[tuple[Path, bool]] = []
    real_fsync = os.fsync
    target = tmp_path / "file"

    def recording_fsync(descriptor: int) -> None:
        synced.append((Path(f"/proc/self/fd/{descriptor}").readlink(), target.exists()))
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(target, b"content", mode=0o644)
    [(file, renamed_before_file), (folder, renamed_before_folder)] = synced
    assert (file.parent, file.name == "file", renamed_before_file) == (tmp_path, False, False)
    assert (folder, renamed_before_folder) == (tmp_path, True)


@pytest.mark.usefixtures("strict_umask")
def test_the_run_report_is_readable_by_all_and_replaced_whole(tmp_path: Path) -> None:
    target = write_report(tmp_path / "reports", {"version": 1})
    assert target.read_text(encoding="utf-8") == '{\n  "version": 1\n}\n'
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert names(target.parent) == [target.name]
