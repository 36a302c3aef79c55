"""LAYERKEEP_CACHE_MAX_MB: the cache folder stays within a size, least recently used out first.

After cache.save, under the cache folder's lock: while the folder holds more than the
budget, the image or cache mount used least recently (restored or saved, see
cache.usage) is dropped, and one line names what went. What this save wrote is never
dropped, nor BuildKit's own cache (the current one only is kept: it is what the next
build reads); when they alone pass the budget, the line says so. The size is what the
files take on disk, each file once (BuildKit's staging folders hold links).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from layerkeep.cache.manifest import Manifest
from layerkeep.cache.mount_folder import MountStore
from layerkeep.cache.store import CacheDir
from layerkeep.cache.store_errors import CorruptCache
from layerkeep.cache.usage import forget, image_key, mount_key, read_usage
from layerkeep.core.log import Log

MB = 1_000_000


@dataclass
class BudgetReport:
    """What keeping to the budget did: sizes before and after, what went."""

    limit: int
    before: int = 0
    after: int = 0
    images: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)

    @property
    def over(self) -> bool:
        """Still past the budget: what this save wrote is bigger than it."""
        return self.after > self.limit


@dataclass(frozen=True)
class _Candidate:
    used: float
    kind: str  # "image" or "mount"
    name: str  # an image's tag, a mount's id
    key: str  # an image's tag, a mount's index key


def folder_size(root: Path) -> int:
    """Bytes the regular files under ``root`` take, each file (inode) once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in _files(root):
        try:
            info = path.lstat()
        except FileNotFoundError:
            continue  # removed meanwhile (a staging folder)
        if (info.st_dev, info.st_ino) not in seen:
            seen.add((info.st_dev, info.st_ino))
            total += info.st_size
    return total


def keep_within_budget(
    cache_dir: Path,
    limit: int,
    *,
    written_images: Collection[str],
    written_mounts: Collection[str],
    log: Log,
) -> BudgetReport:
    """Drop the least recently used images and mounts until the folder fits in ``limit``
    bytes (see the module's notes); ``written_*`` (tags, mount ids) are never dropped."""
    report = BudgetReport(limit)
    cache = CacheDir(cache_dir)
    if not cache.exists():
        return report
    with cache.locked():
        report.before = report.after = folder_size(cache_dir)
        if report.before <= limit:
            return report
        for candidate in _candidates(cache_dir, written_images, written_mounts):
            _drop(cache, candidate)
            (report.images if candidate.kind == "image" else report.mounts).append(candidate.name)
            report.after = folder_size(cache_dir)
            if report.after <= limit:
                break
        forget(cache_dir, [image_key(i) for i in report.images]
               + [mount_key(m) for m in report.mounts])
    log(describe_budget(report))
    return report


def plan_budget(cache_dir: Path, limit: int) -> list[str]:
    """What keeping to ``limit`` bytes would drop now, least recently used first; nothing
    is changed (``cache.prune --dry-run``)."""
    cache = CacheDir(cache_dir)
    if not cache.exists():
        return [f"no cache at {cache_dir}: nothing to drop"]
    size = folder_size(cache_dir)
    if size <= limit:
        return [f"cache folder {cache_dir} holds {size / MB:.1f} MB, within "
                f"{limit // MB} MB: nothing to drop"]
    try:
        manifest = cache.read_manifest()
    except CorruptCache:
        manifest = Manifest()
    mounts = MountStore(cache_dir)
    lines = []
    for candidate in _candidates(cache_dir, (), ()):
        if candidate.kind == "image":
            image = manifest.images.pop(candidate.key)
            needed = {d for other in manifest.images.values() for d in other.layers}
            freed = sum(manifest.blobs[d].stored for d in set(image.layers) - needed
                        if d in manifest.blobs)
        else:
            freed = sum(_file_size(mounts.folder / kept.file)
                        for key, kept in mounts.read_index().items() if key == candidate.key)
        size -= freed
        lines.append(f"would drop {candidate.kind} {candidate.name} "
                     f"({freed / MB:.1f} MB, last used {_when(candidate.used)})")
        if size <= limit:
            break
    lines.append(f"the cache folder would then hold about {size / MB:.1f} MB of "
                 f"{limit // MB} MB allowed")
    return lines


def describe_budget(report: BudgetReport) -> str:
    """The one line on what keeping to the budget dropped."""
    went = [f"image {i}" for i in report.images] + [f"cache mount {m}" for m in report.mounts]
    head = (
        f"cache folder past LAYERKEEP_CACHE_MAX_MB={report.limit // MB} "
        f"({report.before / MB:.1f} MB): "
    )
    dropped = (
        f"dropped {', '.join(went)}, used least recently ({(report.before - report.after) / MB:.1f}"
        f" MB freed, {report.after / MB:.1f} MB now)" if went else "nothing it may drop"
    )
    still = (
        f"; still past it: what this save wrote ({report.after / MB:.1f} MB) is more than "
        "the budget" if report.over else ""
    )
    return head + dropped + still


def _candidates(
    cache_dir: Path, written_images: Collection[str], written_mounts: Collection[str]
) -> list[_Candidate]:
    usage = read_usage(cache_dir).used
    found = []
    try:
        images = CacheDir(cache_dir).read_manifest().images
    except CorruptCache:
        images = {}
    for tag in images:
        if tag not in written_images:
            found.append(_Candidate(usage.get(image_key(tag), 0.0), "image", tag, tag))
    try:
        mounts = MountStore(cache_dir).read_index()
    except CorruptCache:
        mounts = {}
    for key, kept in mounts.items():
        if kept.id not in written_mounts:
            used = max(usage.get(mount_key(kept.id), 0.0), kept.saved)
            found.append(_Candidate(used, "mount", kept.id, key))
    return sorted(found, key=lambda c: (c.used, c.kind, c.name))


def _drop(cache: CacheDir, candidate: _Candidate) -> None:
    """Remove one image (and the layers no other image needs) or one mount; hold the lock."""
    if candidate.kind == "mount":
        MountStore(cache.root).remove([candidate.key])
        return
    manifest = cache.read_manifest()
    manifest.images.pop(candidate.key, None)
    manifest.prune()
    cache.write_manifest(manifest)
    cache.remove_unreferenced(manifest)


def _files(root: Path) -> Iterator[Path]:
    for folder, _, names in os.walk(root):  # what cannot be read is left out
        for name in names:
            yield Path(folder) / name


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _when(at: float) -> str:
    if not at:
        return "never"
    return datetime.datetime.fromtimestamp(at, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
