"""OCI layouts as BuildKit cache sources, and the build CLI's private login.

The engine-level behaviour (pulled images hitting on the containerd store, with and
without a login) is in test_engine_kinds.py; these pin the file handling on layouts
shaped like what dockerd 26 exports.
"""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path
from typing import Any

from layerkeep.build.oci_cache import docker_config_with, point_at_platform_image
from layerkeep.core.registry import Credentials

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
AMD64 = ("linux", "amd64")


def blob(layout: Path, content: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    """Store ``content`` in the layout; its descriptor."""
    digest = hashlib.sha256(content).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(content), **extra}


def image_manifest(layout: Path, *, layer_present: bool = True) -> dict[str, Any]:
    config = blob(layout, b'{"rootfs": {}}', "application/vnd.oci.image.config.v1+json")
    layer = blob(layout, b"layer", "application/vnd.oci.image.layer.v1.tar")
    if not layer_present:
        (layout / "blobs" / "sha256" / layer["digest"].split(":")[1]).unlink()
    body = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": [layer]}
    return blob(layout, json.dumps(body).encode(), MANIFEST)


def pulled_buildx_index(layout: Path, *, layer_present: bool = True) -> None:
    """What `docker save` writes for an image buildx pushed and the engine pulled: an
    index naming this platform's image and an attestation manifest it did not fetch."""
    image = {**image_manifest(layout, layer_present=layer_present),
             "platform": {"architecture": "amd64", "os": "linux"}}
    attestation = {
        "mediaType": MANIFEST, "digest": "sha256:" + "0" * 64, "size": 566,
        "platform": {"architecture": "unknown", "os": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    }
    other = {**image_manifest(layout / "elsewhere"), "platform": {"architecture": "arm64",
                                                                   "os": "linux"}}
    inner = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [other, image, attestation]}
    top = blob(layout, json.dumps(inner).encode(), INDEX,
               annotations={"org.opencontainers.image.ref.name": "main--latest"})
    (layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [top]})
    )


def test_a_pulled_index_is_pointed_at_this_platforms_image(tmp_path: Path) -> None:
    pulled_buildx_index(tmp_path)
    assert point_at_platform_image(tmp_path, AMD64) == "main--latest"
    entry = json.loads((tmp_path / "index.json").read_text())["manifests"]
    assert len(entry) == 1
    assert entry[0]["mediaType"] == MANIFEST
    assert entry[0]["annotations"]["org.opencontainers.image.ref.name"] == "main--latest"
    manifest = tmp_path / "blobs" / "sha256" / entry[0]["digest"].split(":")[1]
    assert json.loads(manifest.read_text())["layers"][0]["digest"].startswith("sha256:")


def test_a_layout_missing_a_layer_is_not_used(tmp_path: Path) -> None:
    pulled_buildx_index(tmp_path, layer_present=False)
    before = (tmp_path / "index.json").read_text()
    assert point_at_platform_image(tmp_path, AMD64) is None
    assert (tmp_path / "index.json").read_text() == before


def test_a_layout_without_this_platform_is_not_used(tmp_path: Path) -> None:
    pulled_buildx_index(tmp_path)
    assert point_at_platform_image(tmp_path, ("linux", "s390x")) is None


def test_the_build_clis_login_keeps_the_users_config_and_plugins(tmp_path: Path) -> None:
    user = tmp_path / "user-docker"
    (user / "cli-plugins").mkdir(parents=True)
    (user / "cli-plugins" / "docker-buildx").write_text("#!/bin/sh\n")
    own = {"credsStore": "desktop", "auths": {"ghcr.io": {}}, "proxies": {"default": {}}}
    (user / "config.json").write_text(json.dumps(own))
    logins = {"registry.example:5000": Credentials("registry.example:5000", "ci", "pw")}

    overlay = docker_config_with(logins, {"DOCKER_CONFIG": str(user)}, tmp_path / "private")

    private = Path(overlay["DOCKER_CONFIG"])
    config = json.loads((private / "config.json").read_text())
    assert config["auths"]["registry.example:5000"] == {"auth": "Y2k6cHc="}  # ci:pw
    assert config["auths"]["ghcr.io"] == {}
    # The credential store still serves every other registry, not this one.
    assert config["credsStore"] == "desktop"
    assert config["credHelpers"] == {"registry.example:5000": ""}
    assert config["proxies"] == {"default": {}}
    assert (private / "cli-plugins" / "docker-buildx").is_file()
    assert stat.S_IMODE((private / "config.json").stat().st_mode) == 0o600
    assert json.loads((user / "config.json").read_text()) == own
