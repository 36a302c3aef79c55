"""Cached images as BuildKit cache sources on the containerd image store.

There, BuildKit ignores a local image's inline cache when given its name, but reads it
from the image's own OCI export (``--cache-from type=local``). All cached images come
out of one ``docker save`` (shared layers once), read as a stream: only the small blobs
(indexes, manifests, configs) are written to the layout, whose index then names each
image's manifest under a tag of ours. BuildKit needs no layer from it: the layers it
reuses are the engine's own, and a layer the export named is one the engine has.

Images pulled from the registry cache are not exported at all: BuildKit reads each
from that repository (``type=registry`` at the digest that was pulled), logged in with
layerkeep's credentials for it when there are some. That is faster (no export) and
steps around two things that make exports of pulled images useless to BuildKit:

- An image that buildx pushed is an *index* (the image for each platform, plus
  attestation manifests). The engine pulled, and so saves, only this platform's image,
  and BuildKit gives up on a source when a manifest its index names is missing. (So
  the layout's index always names the image manifest for the engine's platform.)
- The engine skips downloading a layer whose unpacked form it already has (a shared
  base image), and then ``docker save`` (dockerd 26) leaves out the image's config and
  layers altogether. Such an export is incomplete, and its image is left out.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerkeep.core.engine import Engine
from layerkeep.core.errors import LayerkeepError
from layerkeep.core.imageref import parse_image_ref
from layerkeep.core.registry import DOCKER_HUB, Credentials, local_digests, registry_host
from layerkeep.core.tarstream import ChunkStream, read_members

Log = Callable[[str], None]
CredentialsFor = Callable[[str], Credentials]

SMALL_BLOB = 4 << 20  # indexes, manifests and configs are far smaller; layers rarely
_REF_NAME = "org.opencontainers.image.ref.name"
_IMAGE_NAME = "io.containerd.image.name"
_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
_DIGEST = re.compile(r"(?P<algorithm>[a-z0-9]+):(?P<encoded>[a-f0-9]{32,128})")
_LAYOUT_FILE = re.compile(
    r"blobs/(?P<algorithm>[a-z0-9]+)/(?P<encoded>[a-f0-9]{32,128})|index\.json"
)
_EXPORT_ERRORS = (LayerkeepError, OSError, tarfile.TarError, ValueError)
_INDEX_TYPES = {
    _OCI_INDEX,
    "application/vnd.docker.distribution.manifest.list.v2+json",
}


@dataclass
class ContainerdSources:
    """``--cache-from`` values for the containerd store, and what the CLI needs for them."""

    local: list[str] = field(default_factory=list)
    registry: list[str] = field(default_factory=list)
    environ: dict[str, str] = field(default_factory=dict)

    @property
    def sources(self) -> list[str]:
        """Every ``--cache-from`` value."""
        return self.local + self.registry

    def via(self) -> str:
        """How the build line says the cached images reached BuildKit."""
        ways = [
            f"{len(self.local)} as OCI exports" if self.local else "",
            f"{len(self.registry)} from their registry" if self.registry else "",
        ]
        return f" ({', '.join(filter(None, ways))}: the containerd store's --cache-from)"


def containerd_cache_sources(
    engine: Engine,
    images: Sequence[str],
    stack: contextlib.ExitStack,
    *,
    environ: Mapping[str, str],
    credentials_for: CredentialsFor,
    log: Log,
    cache_repository: str | None = None,
) -> ContainerdSources:
    """Each cached image as a BuildKit cache source (see the module docstring); the temp
    folder lives as long as ``stack``. An image that cannot serve is left out with a
    warning: the build goes on without it.

    ``cache_repository`` is the registry cache backend's repository: an image pulled
    from there is read from there, without an export (0.4 s instead of the engine's
    export time). Other images are exported.
    """
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="layerkeep-oci-")))
    layout = folder / "layout"
    origins = {image: _pulled_from(engine, image, cache_repository) for image in images}
    exporting = [image for image in images if origins[image] is None]
    found = ContainerdSources()
    manifests: dict[str, dict[str, Any]] = {}
    if exporting:
        version = engine.server_version()
        platform = (str(version.get("Os", "linux")), str(version.get("Arch", "amd64")))
        export = _export_each(engine, exporting, layout, log)
        manifests = platform_manifests(layout, export, platform)
    logins: dict[str, Credentials] = {}
    entries: list[dict[str, Any]] = []
    for image in images:
        manifest = manifests.get(full_name(image))
        if manifest is not None:
            tag = f"layerkeep-{len(entries)}"
            entries.append({**manifest, "annotations": {_REF_NAME: tag}})
            found.local.append(f"type=local,src={layout},tag={tag}")
            continue
        origin = origins[image]
        if origin is None:
            log(
                f"warning: {image} is left out of the build's cache: the engine could not "
                "export it whole, and it was not pulled from the registry cache"
            )
            continue
        found.registry.append(f"type=registry,ref={origin}")
        host = registry_host(origin.partition("@")[0])
        credentials = credentials_for(host)
        if credentials.user:
            logins[host] = credentials
    if entries:
        index = {"schemaVersion": 2, "mediaType": _OCI_INDEX, "manifests": entries}
        (layout / "index.json").write_text(json.dumps(index), "utf-8")
        (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}), "utf-8")
    if logins:
        found.environ = docker_config_with(logins, environ, folder / "docker-config")
    return found


@dataclass
class Export:
    """What ``docker save`` put into a layout: its index entries, and the digest of
    every blob it named (the layers among them were read past, not written)."""

    entries: list[dict[str, Any]] = field(default_factory=list)
    digests: set[str] = field(default_factory=set)


def export_layout(engine: Engine, images: Sequence[str], layout: Path) -> Export:
    """One ``docker save`` of ``images`` into the folder ``layout``, writing only the
    blobs of at most ``SMALL_BLOB`` bytes."""
    stream = ChunkStream(engine.save_images(images))
    export = Export()
    for member in read_members(stream):
        match = _LAYOUT_FILE.fullmatch(member.name)
        if member.kind != "file" or match is None:
            continue
        if not match["algorithm"]:  # index.json: kept in memory, a new one is written
            export.entries += json.loads(stream.read(member.size)).get("manifests", [])
            continue
        export.digests.add(f"{match['algorithm']}:{match['encoded']}")
        if member.size > SMALL_BLOB:
            continue  # a layer: read past, never written
        target = layout / member.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as output:
            for piece in stream.pieces(member.size):
                output.write(piece)
    stream.drain()
    return export


def platform_manifests(
    layout: Path, export: Export, platform: tuple[str, str]
) -> dict[str, dict[str, Any]]:
    """Full image name -> the descriptor of its image manifest for ``platform``, for each
    exported image whose config the layout holds and whose every layer was exported."""
    found = {}
    for entry in export.entries:
        name = str(entry.get("annotations", {}).get(_IMAGE_NAME, ""))
        manifest = _platform_manifest(layout, entry, platform)
        if name and manifest is not None and _complete(layout, manifest, export.digests):
            found[name] = manifest
    return found


def full_name(image: str) -> str:
    """``image`` as the containerd store names it: ``app`` -> ``docker.io/library/app:latest``."""
    reference = parse_image_ref(image)
    if reference is None:
        return image
    repository = reference.repository
    if registry_host(repository) == DOCKER_HUB and not repository.startswith(DOCKER_HUB + "/"):
        repository = f"{DOCKER_HUB}/{'' if '/' in repository else 'library/'}{repository}"
    return f"{repository}:{reference.tag}"


def docker_config_with(
    logins: Mapping[str, Credentials], environ: Mapping[str, str], folder: Path
) -> dict[str, str]:
    """A private ``DOCKER_CONFIG`` for the build CLI: the user's own config with these
    logins added (they win over a credential store for their hosts), and the user's CLI
    plugins (buildx) still found."""
    user_folder = Path(environ.get("DOCKER_CONFIG") or Path.home() / ".docker")
    try:
        config: dict[str, Any] = json.loads((user_folder / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        config = {}
    auths = config.setdefault("auths", {})
    helpers = config.setdefault("credHelpers", {})
    for host, credentials in logins.items():
        token = base64.b64encode(f"{credentials.user}:{credentials.password}".encode())
        auths[host] = {"auth": token.decode("ascii")}
        helpers[host] = ""  # an empty helper means "read auths" for this host
    folder.mkdir(mode=0o700)
    descriptor = os.open(folder / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        json.dump(config, file)
    if (user_folder / "cli-plugins").is_dir():
        (folder / "cli-plugins").symlink_to(user_folder / "cli-plugins")
    return {"DOCKER_CONFIG": str(folder)}


def _export_each(engine: Engine, images: Sequence[str], layout: Path, log: Log) -> Export:
    """All ``images`` in one ``docker save``; when the engine refuses that, one at a
    time, leaving out (with a warning) those it refuses."""
    try:
        return export_layout(engine, images, layout)
    except _EXPORT_ERRORS as error:
        if len(images) == 1:
            log(f"warning: {images[0]} not exported for the build: {_reason(error)}")
            return Export()
    merged = Export()
    for image in images:
        try:
            part = export_layout(engine, [image], layout)
        except _EXPORT_ERRORS as error:
            log(f"warning: {image} not exported for the build: {_reason(error)}")
            continue
        merged.entries += part.entries
        merged.digests |= part.digests
    return merged


def _pulled_from(engine: Engine, image: str, repository: str | None) -> str | None:
    """``<repository>@<digest>`` when ``image`` was pulled from ``repository``.

    Only that repository counts: on the containerd store every tag of an image gets a
    "repo digest", pulled or not (``myorg/app@sha256:...`` for a local ``myorg/app``).
    """
    if repository is None:
        return None
    prefix = f"{repository}@"
    return next((name for name in local_digests(engine, image) if name.startswith(prefix)), None)


def _reason(error: Exception) -> str:
    return error.one_line() if isinstance(error, LayerkeepError) else str(error)


def _platform_manifest(
    layout: Path, descriptor: dict[str, Any], platform: tuple[str, str]
) -> dict[str, Any] | None:
    """The image manifest ``descriptor`` leads to for ``platform`` among the blobs the
    layout holds: itself, or a matching entry of the index it names (nested or not)."""
    blob = _blob(layout, descriptor)
    if blob is None:
        return None
    if descriptor.get("mediaType") not in _INDEX_TYPES:
        return descriptor
    for entry in json.loads(blob.read_text("utf-8")).get("manifests", []):
        wanted = entry.get("platform", {})
        if (wanted.get("os"), wanted.get("architecture")) != platform:
            continue  # another platform, or an attestation ("unknown/unknown")
        found = _platform_manifest(layout, entry, platform)
        if found is not None:
            return found
    return None


def _complete(layout: Path, manifest: dict[str, Any], exported: set[str]) -> bool:
    """Whether the layout holds the manifest and its config, and the engine exported
    every layer (so has them all)."""
    blob = _blob(layout, manifest)
    if blob is None:
        return False
    content = json.loads(blob.read_text("utf-8"))
    layers = content.get("layers", [])
    return _blob(layout, content.get("config", {})) is not None and all(
        str(layer.get("digest")) in exported for layer in layers
    )


def _blob(layout: Path, descriptor: dict[str, Any]) -> Path | None:
    """Where the layout keeps ``descriptor``'s blob, if it has it."""
    match = _DIGEST.fullmatch(str(descriptor.get("digest", "")))
    if match is None:
        return None
    path = layout / "blobs" / match["algorithm"] / match["encoded"]
    return path if path.is_file() else None
