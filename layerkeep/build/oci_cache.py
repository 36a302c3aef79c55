"""Cached images as BuildKit cache sources on the containerd image store.

There, BuildKit ignores a local image's inline cache when given its name, but reads it
from the image's own OCI export (``--cache-from type=local``). ``docker save`` on that
store writes an OCI layout, whose ``index.json`` names the image by its tag. Two things
can stand in the way, both for images pulled from a registry:

- An image that buildx pushed is an *index* (the image for each platform, plus
  attestation manifests). The engine pulled, and so saves, only this platform's image,
  and BuildKit gives up on a source when a manifest its index names is missing: each
  layout is pointed straight at the image manifest for the engine's platform.
- The engine skips downloading a layer whose unpacked form it already has (a shared
  base image), and then ``docker save`` (dockerd 26) leaves out the image's config and
  layers altogether. Such an image is read from the registry it was pulled from instead
  (``type=registry`` at its digest), with layerkeep's credentials for that registry when
  it has some.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from layerkeep.core.engine import Engine
from layerkeep.core.errors import LayerkeepError
from layerkeep.core.registry import Credentials, local_digests, registry_host

Log = Callable[[str], None]
CredentialsFor = Callable[[str], Credentials]

_REF_NAME = "org.opencontainers.image.ref.name"
_INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
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
) -> ContainerdSources:
    """Each cached image as a BuildKit cache source (see the module docstring); temp
    folders live as long as ``stack``. An image that cannot serve is left out with a
    warning: the build goes on without it."""
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="layerkeep-oci-")))
    version = engine.server_version()
    platform = (str(version.get("Os", "linux")), str(version.get("Arch", "amd64")))
    found = ContainerdSources()
    logins: dict[str, Credentials] = {}
    for number, image in enumerate(images):
        layout = folder / str(number)
        try:
            _export(engine, image, layout)
            tag = point_at_platform_image(layout, platform)
            if tag is not None:
                found.local.append(f"type=local,src={layout},tag={tag}")
                continue
        except (LayerkeepError, OSError, tarfile.TarError, ValueError) as error:
            reason = error.one_line() if isinstance(error, LayerkeepError) else str(error)
            log(f"warning: {image} is left out of the build's cache: {reason}")
            continue
        origin = next(iter(local_digests(engine, image)), None)
        if origin is None:
            log(
                f"warning: {image} is left out of the build's cache: the engine's export "
                "of it is incomplete and it came from no registry"
            )
            continue
        found.registry.append(f"type=registry,ref={origin}")
        host = registry_host(origin.partition("@")[0])
        credentials = credentials_for(host)
        if credentials.user:
            logins[host] = credentials
    if logins:
        found.environ = docker_config_with(logins, environ, folder / "docker-config")
    return found


def point_at_platform_image(layout: Path, platform: tuple[str, str]) -> str | None:
    """Make ``layout``'s index name the image manifest for ``platform`` directly; the tag
    it is named by, or None when the layout lacks that image's config or a layer."""
    index_file = layout / "index.json"
    index = json.loads(index_file.read_text("utf-8"))
    entry = (index.get("manifests") or [{}])[0]
    tag = str(entry.get("annotations", {}).get(_REF_NAME, ""))
    if not tag:
        raise LayerkeepError(f"its OCI export's {index_file.name} names no tag")
    manifest = _platform_manifest(layout, entry, platform)
    if manifest is None or not _complete(layout, manifest):
        return None
    if manifest is not entry:
        index["manifests"] = [{**manifest, "annotations": entry["annotations"]}]
        index_file.write_text(json.dumps(index), "utf-8")
    return tag


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


def _export(engine: Engine, image: str, layout: Path) -> None:
    """``docker save`` of ``image``, unpacked into the folder ``layout``."""
    archive = layout.with_suffix(".tar")
    with archive.open("wb") as output:
        for chunk in engine.save_image(image):
            output.write(chunk)
    with tarfile.open(archive) as saved:
        saved.extractall(layout, filter="data")
    archive.unlink()


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


def _complete(layout: Path, manifest: dict[str, Any]) -> bool:
    """Whether the layout holds the manifest, its config and every layer."""
    blob = _blob(layout, manifest)
    if blob is None:
        return False
    content = json.loads(blob.read_text("utf-8"))
    needed = [content.get("config", {}), *content.get("layers", [])]
    return all(_blob(layout, descriptor) is not None for descriptor in needed)


def _blob(layout: Path, descriptor: dict[str, Any]) -> Path | None:
    """Where the layout keeps ``descriptor``'s blob, if it has it."""
    algorithm, _, encoded = str(descriptor.get("digest", "")).partition(":")
    path = layout / "blobs" / algorithm / encoded
    return path if encoded and path.is_file() else None
