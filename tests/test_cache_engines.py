"""The folder cache on every engine kind: Docker 26 with the classic and the containerd
image store (started beside the main 20.10 one), and caches moving between kinds.

Each 26 engine is private to this module, so its tests may prune its builder cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from conftest import SESSION_LABEL, TEST_LABEL
from sample_project import make_project
from second_engine import SecondEngineUnavailable, ensure_docker26, second_engine, transfer_images

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.builder import choose_builder
from layerkeep.building.image import build_image
from layerkeep.cache.archive import read_saved
from layerkeep.cache.blob_writer import BlobWriter
from layerkeep.cache.layer_load import load_images
from layerkeep.cache.layer_save import save_images
from layerkeep.cache.store import CacheDir
from layerkeep.core.engine import Engine, connect, describe_host
from layerkeep.core.errors import DockerOperationError
from layerkeep.core.settings import Settings

pytestmark = pytest.mark.docker
BASE = "debian:bookworm-slim"
# How the blobs of each kind's `docker save` over 1 kB begin: layers, and JSON configs
# and manifests.
LAYER_STARTS = {"classic26": {"tar", "json"}, "containerd26": {"gzip", "tar", "json"}}


@dataclass(frozen=True)
class Kind:
    """An engine to run on, the client environment reaching it, and what it is."""

    name: str
    engine: Engine
    environ: dict[str, str]


@pytest.fixture(scope="module", params=["classic26", "containerd26"])
def kind(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kind]:
    name = str(request.param)
    try:
        docker26 = ensure_docker26()
        with second_engine(
            tmp_path_factory.mktemp(name), docker26=docker26,
            containerd_store=name == "containerd26",
        ) as second:
            transfer_images(dict(os.environ), dict(second.environ), [BASE])
            engine = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            try:
                assert engine.uses_containerd_store() == (name == "containerd26")
                yield Kind(name, engine, dict(second.environ))
            finally:
                engine.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))


class Hashing:
    """A layer store that only hashes: what an archive's layers really contain."""

    def __init__(self) -> None:
        self.stored: dict[str, str] = {}

    def cached(self, name: str, size: int) -> Collection[str]:
        return ()

    def has(self, digest: str) -> bool:
        return False

    def store(self, name: str, pieces: Iterable[bytes]) -> Callable[[], str]:
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        self.stored[name] = "sha256:" + digest.hexdigest()
        return lambda: self.stored[name]


def build_on(
    kind_engine: Engine, environ: dict[str, str], settings: Settings, builder: str
) -> tuple[int, int]:
    """Build the sample project; the number of steps reused, of how many."""
    if kind_engine.where != describe_host(os.environ):
        # A 26 engine is private to this module: its earlier builds must not be reused.
        kind_engine.api.prune_builds(all=True)
    chosen = choose_builder(builder, environ, engine=kind_engine)
    report = build_image(kind_engine, settings, chosen, environ, log=lambda _: None)
    return report.tally.reused, report.tally.total


def wipe(engine: Engine, settings: Settings) -> None:
    for image in images_to_cache(settings):
        engine.remove_image(image, force=True)
    assert all(engine.image_id(image) is None for image in images_to_cache(settings))


def check_restored(engine: Engine, environ: dict[str, str], settings: Settings) -> None:
    """The restored app runs, and saving it again gives the same, whole image."""
    app = str(settings.require_image())
    out = subprocess.run(
        ["docker", "run", "--rm", app], env=environ, capture_output=True, text=True, check=True
    )
    assert out.stdout == "hello\n"
    # A load that left a layer out would give an image whose save lacks that layer.
    hashing = Hashing()
    saved = read_saved(engine.save_image(app), hashing, image=app)
    cached = CacheDir(settings.cache_dir).read_manifest().images[app]
    assert saved[0].layers == cached.layers
    assert saved[0].config == cached.config


def archive_kinds(engine: Engine, image: str) -> tuple[set[str], set[str]]:
    """The top-level names of a raw `docker save`, and how its blobs start (gzip, tar, json)."""
    data = b"".join(engine.save_image(image))
    names: set[str] = set()
    starts: set[str] = set()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        for member in archive:
            names.add(member.name.split("/")[0])
            if member.isfile() and member.name.startswith("blobs/") and member.size > 1024:
                extracted = archive.extractfile(member)
                assert extracted is not None
                head = extracted.read(512)
                starts.add("gzip" if head[:2] == b"\x1f\x8b" else
                           "tar" if head[257:262] == b"ustar" else
                           "json" if head[:1] == b"{" else "other")
    return names, starts


@pytest.mark.private_engines
def test_save_reads_the_engines_layout_and_keys_layers_by_diff_id(
    kind: Kind, tmp_path: Path
) -> None:
    settings = make_project(tmp_path, f"lkc/{kind.name}", kind.engine)
    build_on(kind.engine, kind.environ, settings, "buildkit")
    app = str(settings.require_image())
    names, starts = archive_kinds(kind.engine, app)
    assert {"index.json", "oci-layout", "blobs", "manifest.json"} <= names
    # The classic store saves layers as plain tars; the containerd store keeps BuildKit's
    # compressed ones (and the imported base's plain tar).
    assert starts == LAYER_STARTS[kind.name]

    report = save_images(kind.engine, CacheDir(settings.cache_dir), [app], log=lambda _: None)

    assert report.saved == [app]
    manifest = CacheDir(settings.cache_dir).read_manifest()
    image = manifest.images[app]
    assert image.engine_id == kind.engine.image_id(app)
    for digest in image.layers:
        blob = manifest.blobs[digest]
        compressed = (settings.cache_dir / blob.file).read_bytes()
        content = zstandard.ZstdDecompressor().stream_reader(compressed).read()
        assert "sha256:" + hashlib.sha256(content).hexdigest() == digest
        assert len(content) == blob.size


@pytest.mark.private_engines
def test_save_wipe_load_and_build_again(kind: Kind, tmp_path: Path) -> None:
    settings = make_project(tmp_path, f"lkc/{kind.name}-cycle", kind.engine)
    cold, cold_total = build_on(kind.engine, kind.environ, settings, "buildkit")
    cache = CacheDir(settings.cache_dir)
    save_images(kind.engine, cache, images_to_cache(settings), log=lambda _: None)
    wipe(kind.engine, settings)
    kind.engine.api.prune_builds(all=True)  # this engine is private to the module

    loaded = load_images(kind.engine, cache, log=lambda _: None)

    assert loaded.failed == []
    app, stage, base = images_to_cache(settings)
    assert sorted(loaded.restored) == sorted([app, stage])
    # debian:bookworm-slim is still there, under another name: recognised, not sent again.
    assert loaded.present == [base]
    check_restored(kind.engine, kind.environ, settings)
    assert cold == 0
    # Unchanged after the load: nothing read or written. (On the containerd store the
    # loaded images may get other ids; their layers and config are the cached ones.)
    again = save_images(kind.engine, cache, images_to_cache(settings), log=lambda _: None)
    assert sorted(again.unchanged) == sorted([app, stage, base])
    assert (again.saved, again.engine_reads, again.layers_written) == ([], 0, 0)
    warm, _ = build_on(kind.engine, kind.environ, settings, "buildkit")
    # The images serve as cache on the classic store. On the containerd store BuildKit
    # reads only its own cache export (tests/test_buildkit_cache.py), not images.
    assert warm == (0 if kind.name == "containerd26" else cold_total)


@pytest.mark.parametrize("direction", ["from-20.10", "to-20.10"])
def test_a_cache_moves_between_engine_kinds(
    kind: Kind, engine: Engine, unique_repository: str, tmp_path: Path, direction: str
) -> None:
    main_environ = dict(os.environ)
    writer, reader = (engine, kind.engine) if direction == "from-20.10" else (kind.engine, engine)
    writer_environ, reader_environ = (
        (main_environ, kind.environ) if direction == "from-20.10" else (kind.environ, main_environ)
    )
    settings = make_project(tmp_path, unique_repository, writer)
    # The base's tag must exist on the reader too, as a user's pulled base would.
    reader.tag_image(BASE, f"{unique_repository}-base:1")
    build_on(writer, writer_environ, settings, "legacy" if writer is engine else "buildkit")
    cache = CacheDir(settings.cache_dir)
    save_images(writer, cache, images_to_cache(settings), log=lambda _: None)

    loaded = load_images(reader, cache, log=lambda _: None)

    assert loaded.failed == []
    assert sorted(loaded.restored) == sorted(images_to_cache(settings)[:2])
    check_restored(reader, reader_environ, settings)


def test_reads_the_legacy_layout_of_20_10(engine: Engine) -> None:
    names, _ = archive_kinds(engine, BASE)
    assert "manifest.json" in names
    assert "oci-layout" not in names
    hashing = Hashing()

    saved = read_saved(engine.save_image(BASE), hashing, image=BASE)

    assert [name.endswith("/layer.tar") for name in hashing.stored] == [True]
    assert saved[0].layers == tuple(hashing.stored.values())
    assert saved[0].repo_tags == (BASE,)


class IntoCache:
    """A layer store that writes into a real cache folder."""

    def __init__(self, writer: BlobWriter) -> None:
        self.writer = writer

    def cached(self, name: str, size: int) -> Collection[str]:
        return ()

    def has(self, digest: str) -> bool:
        return False

    def store(self, name: str, pieces: Iterable[bytes]) -> Callable[[], str]:
        stored = self.writer.write(pieces)
        return lambda: stored()[0]


def test_a_broken_compressed_layer_is_the_engines_fault_in_one_line(tmp_path: Path) -> None:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        for name, content in (
            ("blobs/sha256/" + "a" * 64, b"\x1f\x8b\x08\x00" + os.urandom(2000)),
            ("manifest.json", b'[{"Config": "c", "Layers": ["blobs/sha256/' + b"a" * 64 + b'"]}]'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    data.seek(0)

    with (
        pytest.raises(DockerOperationError) as caught,
        BlobWriter(CacheDir(tmp_path / "cache"), level=1, threads=1) as writer,
    ):
        read_saved([data.getvalue()], IntoCache(writer), image="app:1")

    assert caught.value.one_line().startswith("docker save app:1 gave an unreadable archive")
    assert not list((tmp_path / "cache" / "blobs").iterdir())
