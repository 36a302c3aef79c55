"""The folder cache's BuildKit part on a real Docker 26 engine with the containerd store:
bounded, atomic, healing damaged blobs, safe for two jobs at once, and a cache export
that fails (a full disk) never fails the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import SESSION_LABEL, TEST_LABEL
from registry_setup import running_registry
from second_engine import (
    SecondEngine,
    SecondEngineUnavailable,
    ensure_docker26,
    second_engine,
    transfer_images,
)

from layerkeep.building.builder import Builder, choose_builder
from layerkeep.building.image import BuildReport
from layerkeep.cache.backend import SaveOutcome, build_with_cache, save_cache
from layerkeep.cache.buildkit_dir import FOLDER, STAGINGS
from layerkeep.cache.buildkit_layout import (
    CONFIG_TYPE,
    INDEX_TYPE,
    blob_path,
    without_blobs,
)
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, connect
from layerkeep.core.settings import Settings, load_settings
from layerkeep.release.push import push_release

pytestmark = [pytest.mark.docker, pytest.mark.private_engines]

BASE = "debian:bookworm-slim"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # how a zstd frame starts (the layers' default)
DOCKERFILE = """\
FROM debian:bookworm-slim AS deps
COPY blob.bin /blob.bin
RUN sha256sum /blob.bin > /sums

FROM debian:bookworm-slim
COPY --from=deps /sums /sums
COPY app.txt /app.txt
"""


@dataclass
class Containerd:
    """A throw-away Docker 26 engine on the containerd image store."""

    second: SecondEngine
    engine: Engine

    @property
    def environ(self) -> dict[str, str]:
        return dict(self.second.environ)

    @property
    def docker(self) -> str:
        """This engine's own docker CLI (26.1.5)."""
        return shutil.which("docker", path=self.environ.get("PATH")) or "docker"

    def fresh(self, image: str) -> None:
        """A fresh machine: the app image gone, the builder cache empty."""
        if self.engine.image_id(image):
            self.engine.remove_image(image, force=True)
        self.second.prune_builder()


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    folder = tmp_path_factory.mktemp("buildkit-cache")
    try:
        with second_engine(folder, docker26=ensure_docker26(), containerd_store=True) as second:
            transfer_images(os.environ, second.environ, [BASE])
            engine = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            try:
                yield Containerd(second, engine)
            finally:
                engine.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))


@dataclass
class Project:
    """A two-stage project whose deps layer is ``size`` bytes of its own random data."""

    root: Path
    cache: Path
    image: str
    containerd: Containerd
    build_id: str = "local"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def make(cls, root: Path, containerd: Containerd, *, size: int = 4 << 20) -> Project:
        root.mkdir(parents=True)
        (root / "Dockerfile").write_text(DOCKERFILE)
        (root / "blob.bin").write_bytes(os.urandom(size))
        (root / "app.txt").write_text("v0\n")
        image = f"lk-bkcache-{root.name}-{os.urandom(3).hex()}/app"
        return cls(root, root / "cache", image, containerd)

    def settings(self, **extra: str) -> Settings:
        environ = {
            **self.containerd.environ,
            "LAYERKEEP_IMAGE": self.image,
            "LAYERKEEP_CONTEXT": str(self.root),
            "LAYERKEEP_CACHE_DIR": str(self.cache),
            "LAYERKEEP_BUILD_ID": self.build_id,
            **self.extra,
            **extra,
        }
        return load_settings(self.root, environ, git_facts=lambda _: GitFacts("", ""))

    def builder(self, settings: Settings) -> Builder:
        chosen = choose_builder("auto", self.containerd.environ, engine=self.containerd.engine)
        assert chosen.exports_cache
        return chosen

    def ci(self, lines: list[str] | None = None) -> tuple[BuildReport, SaveOutcome]:
        """What `inv cache.save` does on a fresh machine: build from the cache, save."""
        settings = self.settings()
        builder = self.builder(settings)
        log = (lines if lines is not None else []).append
        self.containerd.fresh(f"{self.image}:latest")
        engine, environ = self.containerd.engine, self.containerd.environ
        built = build_with_cache(engine, settings, builder, environ, log=log)
        saved = save_cache(engine, settings, builder, environ, log=log)
        return built, saved

    def edit(self, text: str) -> None:
        (self.root / "app.txt").write_text(text)

    def manifest(self) -> dict[str, object]:
        return dict(json.loads((self.cache / "manifest.json").read_text()))

    def blobs(self) -> dict[str, int]:
        """Every blob file of the BuildKit cache -> its size."""
        folder = self.cache / FOLDER / "blobs" / "sha256"
        return {f"sha256:{path.name}": path.stat().st_size for path in folder.iterdir()}

    def needed(self) -> set[str]:
        """The blobs the cache manifest the cache points at names (and itself)."""
        pointer = self.manifest()["buildkit"]
        assert isinstance(pointer, dict)
        shared = self.cache / FOLDER
        content = json.loads(blob_path(shared, str(pointer["digest"])).read_bytes())
        return {str(pointer["digest"]), *(str(e["digest"]) for e in content["manifests"])}

    def assert_sound(self) -> None:
        """The folder holds exactly what its pointer needs, each blob its digest."""
        assert set(self.blobs()) == self.needed()
        for digest in self.blobs():
            data = blob_path(self.cache / FOLDER, digest).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
        index = json.loads((self.cache / FOLDER / "index.json").read_text())
        assert index["manifests"][0]["digest"] == self.manifest()["buildkit"]["digest"]  # type: ignore[index]
        assert not [p for p in (self.cache / STAGINGS).iterdir() if p.suffix != ".lock"]


def deps_blob(project: Project) -> str:
    """The deps stage's big layer: the largest blob but the base image's (the stand-in
    base went in uncompressed, so BuildKit keeps its layer as it is)."""
    base = set((project.containerd.engine.image_attrs(BASE) or {})["RootFS"]["Layers"])
    blobs = {d: size for d, size in project.blobs().items() if d not in base}
    return max(blobs.items(), key=lambda item: item[1])[0]


def test_each_save_keeps_one_cache_and_only_the_blobs_it_needs(
    containerd: Containerd, tmp_path: Path
) -> None:
    project = Project.make(tmp_path / "bounded", containerd)
    cold, saved = project.ci()
    assert cold.tally.reused == 0
    assert saved.buildkit is not None
    assert saved.buildkit.blobs_written == saved.buildkit.blobs
    project.assert_sound()
    first = project.blobs()
    for number in range(1, 4):
        project.edit(f"v{number}\n")
        built, saved = project.ci()
        # Every step but the edited COPY comes from the folder, on a fresh machine.
        assert built.tally.reused == built.tally.total - 1, built.reuse
        assert "from BuildKit's own cache" in built.reuse
        assert saved.buildkit is not None
        # Only what changed is written (the edited layer, the cache config and manifest).
        assert saved.buildkit.blobs_written <= 3
        assert saved.buildkit.bytes_written < 100_000
        project.assert_sound()
        assert sum(project.blobs().values()) < sum(first.values()) + 100_000
    unchanged_build, unchanged = project.ci()
    assert unchanged_build.tally.reused == unchanged_build.tally.total
    assert unchanged.buildkit is not None
    assert unchanged.buildkit.bytes_written < 100_000


def image_layer_types(containerd: Containerd, image: str) -> list[str]:
    """The media types of ``image``'s layers as the engine holds them (its OCI save)."""
    saved = subprocess.run(
        [containerd.docker, "save", image], env=containerd.environ, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as archive:

        def read(digest: str) -> dict[str, Any]:
            member = archive.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}")
            assert member is not None
            return dict(json.load(member))

        index_file = archive.extractfile("index.json")
        assert index_file is not None
        document = read(json.load(index_file)["manifests"][0]["digest"])
        while "manifests" in document:  # an index (with attestations): its image
            document = read(document["manifests"][0]["digest"])
    return [str(layer["mediaType"]) for layer in document["layers"]]


def cache_layer_types(project: Project) -> set[str]:
    """The media types of the layers BuildKit's cache in the folder names."""
    pointer = project.manifest()["buildkit"]
    assert isinstance(pointer, dict)
    content = json.loads(blob_path(project.cache / FOLDER, str(pointer["digest"])).read_bytes())
    return {str(entry["mediaType"]) for entry in content["manifests"]} - {CONFIG_TYPE}


@pytest.mark.parametrize("compression", ["zstd", "gzip"])
def test_layers_take_the_compression_set_and_every_step_still_comes_back(
    containerd: Containerd, tmp_path: Path, compression: str
) -> None:
    project = Project.make(tmp_path / compression, containerd)
    if compression == "gzip":  # zstd is the default
        project.extra["LAYERKEEP_LAYER_COMPRESSION"] = "gzip"
    project.ci()
    project.edit("v1\n")
    built, _ = project.ci()
    assert built.tally.reused == built.tally.total - 1, built.reuse

    image = f"{project.image}:latest"
    # The base image's layer went in uncompressed; every layer the build made is zstd/gzip.
    made = image_layer_types(containerd, image)[1:]
    assert made
    assert all(kind.endswith(f"+{compression}") for kind in made), made
    layer = "application/vnd.oci.image.layer.v1.tar"  # the base's, as it went in
    assert cache_layer_types(project) == {layer, f"{layer}+{compression}"}

    # What release.push sends is that image, and a Docker 26 engine pulls and runs it.
    with running_registry(tmp_path / "registry") as registry:
        settings = project.settings(
            LAYERKEEP_REGISTRY=registry.address, LAYERKEEP_COMMIT="0" * 40,
            LAYERKEEP_BRANCH="main",
        )
        report = push_release(containerd.engine, settings, log=lambda _: None)
        pushed = f"{registry.address}/{project.image}:{'0' * 40}"
        status, manifest, _ = registry.get(f"/v2/{project.image}/manifests/{report.digest}")
        assert status == 200
        while "manifests" in manifest:
            manifest = registry.get(
                f"/v2/{project.image}/manifests/{manifest['manifests'][0]['digest']}"
            )[1]
        assert all(
            layer["mediaType"].endswith(f"+{compression}") for layer in manifest["layers"][1:]
        )
        containerd.fresh(image)
        pull = [containerd.docker, "pull", "-q", pushed]
        subprocess.run(pull, env=containerd.environ, check=True)
        shown = subprocess.run(
            [containerd.docker, "run", "--rm", pushed, "cat", "/app.txt"],
            env=containerd.environ, capture_output=True, text=True, check=True,
        )
        assert shown.stdout == "v1\n"
        containerd.engine.remove_image(pushed, force=True)


@pytest.mark.parametrize(("before", "after"), [("gzip", "zstd"), ("zstd", "gzip")])
def test_a_cache_saved_with_the_other_compression_still_gives_every_step(
    containerd: Containerd, tmp_path: Path, before: str, after: str
) -> None:
    # Upgrading layerkeep (gzip caches) or changing the setting keeps the cache working.
    project = Project.make(tmp_path / f"{before}-{after}", containerd)
    project.extra["LAYERKEEP_LAYER_COMPRESSION"] = before
    project.ci()
    project.extra["LAYERKEEP_LAYER_COMPRESSION"] = after
    for number in range(1, 3):
        project.edit(f"v{number}\n")
        built, _ = project.ci()
        assert built.tally.reused == built.tally.total - 1, built.reuse
        project.assert_sound()
        shown = subprocess.run(
            [containerd.docker, "run", "--rm", f"{project.image}:latest", "cat", "/app.txt"],
            env=containerd.environ, capture_output=True, text=True, check=True,
        )
        assert shown.stdout == f"v{number}\n"


def damage(path: Path) -> None:
    """The same size, other content: a bit flip on disk."""
    with path.open("r+b") as stream:
        stream.seek(path.stat().st_size // 2)
        byte = stream.read(1)
        stream.seek(-1, os.SEEK_CUR)
        stream.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("fault", ["damaged", "missing"])
def test_a_bad_blob_is_dropped_with_a_warning_and_the_save_leaves_the_cache_sound(
    containerd: Containerd, tmp_path: Path, fault: str
) -> None:
    project = Project.make(tmp_path / fault, containerd)
    project.ci()
    victim = deps_blob(project)
    path = blob_path(project.cache / FOLDER, victim)
    if fault == "damaged":
        damage(path)
    else:
        path.unlink()
    lines: list[str] = []
    built, saved = project.ci(lines)
    assert any("missing or damaged" in line and victim[:19] in line for line in lines), lines
    assert built.tally.total > 0
    assert saved.buildkit is not None
    # Nothing damaged is left, and the cache serves the next fresh machine in full.
    project.assert_sound()
    again, _ = project.ci()
    assert again.tally.reused == again.tally.total, again.reuse


def test_a_save_that_finds_a_damaged_export_leaves_the_cache_as_it_was(
    containerd: Containerd, tmp_path: Path
) -> None:
    project = Project.make(tmp_path / "atomic", containerd)
    project.ci()
    before = (project.manifest(), project.blobs())
    project.edit("v1\n")
    settings = project.settings()
    builder = project.builder(settings)
    engine, environ = containerd.engine, containerd.environ
    containerd.fresh(f"{project.image}:latest")
    build_with_cache(engine, settings, builder, environ, log=lambda _: None)
    # Between the build and the save, the export's new layer is damaged on disk.
    staging = project.cache / STAGINGS / "local"
    new = [  # written by this build (one link), and a layer (zstd), not JSON
        path for path in staging.glob("blobs/sha256/*")
        if path.stat().st_nlink == 1 and path.read_bytes()[:4] == ZSTD_MAGIC
    ]
    assert len(new) == 1
    damage(new[0])
    with pytest.raises(Exception, match="other content; the cache was left as it was"):
        save_cache(engine, settings, builder, environ, log=lambda _: None)
    assert (project.manifest(), project.blobs()) == before


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_cache_export_that_fills_the_disk_is_a_warning_and_the_cache_stays(
    containerd: Containerd, tmp_path: Path
) -> None:
    project = Project.make(tmp_path / "full", containerd, size=1 << 20)
    project.cache.mkdir()
    # The cold cache takes about 80 MB (the stand-in base's layer is kept uncompressed).
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=110m", "tmpfs", str(project.cache)], check=True
    )
    try:
        project.ci()
        before = (project.manifest(), project.blobs())
        # A deps layer bigger than the disk has left: BuildKit's export cannot write it.
        (project.root / "blob.bin").write_bytes(os.urandom(48 << 20))
        lines: list[str] = []
        built, saved = project.ci(lines)
        # The build's export fails, and so does the one cache.save tries again.
        failed = [line for line in lines if "BuildKit could not export its cache" in line]
        assert len(failed) == 2, lines[-20:]
        assert built.tally.total > 0
        assert containerd.engine.image_id(f"{project.image}:latest")
        assert saved.buildkit is None
        assert (project.manifest(), project.blobs()) == before
    finally:
        subprocess.run(["umount", str(project.cache)], check=False)


def test_two_jobs_sharing_the_cache_folder_at_once_both_build_and_leave_it_sound(
    containerd: Containerd, tmp_path: Path
) -> None:
    first = Project.make(tmp_path / "shared", containerd)
    first.ci()
    twin = Project(first.root, first.cache, first.image + "-twin", containerd, "job-2")
    errors: list[BaseException] = []

    def job(project: Project, text: str) -> None:
        try:
            settings = project.settings()
            builder = project.builder(settings)
            engine, environ = containerd.engine, containerd.environ
            build_with_cache(engine, settings, builder, environ, log=lambda _: None)
            save_cache(engine, settings, builder, environ, log=lambda _: None)
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    first.edit("both\n")
    threads = [threading.Thread(target=job, args=(p, "x")) for p in (first, twin)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    first.assert_sound()
    with contextlib.suppress(Exception):
        containerd.engine.remove_image(f"{twin.image}:latest", force=True)


def test_the_cache_config_loses_only_results_over_a_damaged_blob(tmp_path: Path) -> None:
    """The surgery alone, on a layout shaped like BuildKit's export."""
    def put(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        path = blob_path(tmp_path, digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return digest

    a, b, c = (put(name.encode()) for name in ("layer a", "layer b", "layer c"))
    config = {
        "layers": [{"blob": a, "parent": -1}, {"blob": b, "parent": 0}, {"blob": c, "parent": -1}],
        "records": [
            {"digest": "k1", "layers": [{"layer": 0}]},
            {"digest": "k2", "layers": [{"layer": 1}], "inputs": [[{"link": 0}]]},
            {"digest": "k3", "layers": [{"layer": 2}]},
            {"digest": "k4", "chains": [{"layers": [2, 1]}]},
        ],
    }
    config_data = json.dumps(config).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [
            *({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 7}
              for d in (a, b, c)),
            {"mediaType": CONFIG_TYPE, "digest": put(config_data), "size": len(config_data)},
        ],
    }
    data = json.dumps(manifest).encode()
    descriptor = {"mediaType": INDEX_TYPE, "digest": put(data), "size": len(data)}

    repaired = without_blobs(tmp_path, descriptor, {a})
    content = json.loads(blob_path(tmp_path, repaired["digest"]).read_bytes())
    entry = next(e for e in content["manifests"] if e["mediaType"] == CONFIG_TYPE)
    config_read = json.loads(blob_path(tmp_path, entry["digest"]).read_bytes())
    records = {r["digest"]: r for r in config_read["records"]}
    # a is damaged, and b sits on a: only c's results survive (k4's chain names b).
    assert records["k1"]["layers"] == []
    assert records["k2"]["layers"] == []
    assert records["k3"]["layers"] == [{"layer": 2}]
    assert records["k4"]["chains"] == []
    assert repaired["digest"] != descriptor["digest"]
