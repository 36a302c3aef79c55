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

from layerkeep.build.oci_cache import (
    Export,
    docker_config_with,
    full_name,
    platform_manifests,
)
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


def image_manifest(layout: Path) -> tuple[dict[str, Any], str]:
    """A manifest and its config in the layout; its descriptor, and its layer's digest
    (left out of the layout, as export_layout leaves layers out)."""
    config = blob(layout, b'{"rootfs": {}}', "application/vnd.oci.image.config.v1+json")
    digest = "sha256:" + hashlib.sha256(b"layer").hexdigest()
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": 5}
    body = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": [layer]}
    return blob(layout, json.dumps(body).encode(), MANIFEST), digest


def pulled_buildx_index(layout: Path, name: str) -> Export:
    """What export_layout makes of `docker save` for an image buildx pushed and the
    engine pulled: an index naming this platform's image and an attestation manifest
    it did not fetch."""
    manifest, layer = image_manifest(layout)
    image = {**manifest, "platform": {"architecture": "amd64", "os": "linux"}}
    attestation = {
        "mediaType": MANIFEST, "digest": "sha256:" + "0" * 64, "size": 566,
        "platform": {"architecture": "unknown", "os": "unknown"},
        "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
    }
    other, _ = image_manifest(layout / "elsewhere")
    other["platform"] = {"architecture": "arm64", "os": "linux"}
    inner = {"schemaVersion": 2, "mediaType": INDEX, "manifests": [other, image, attestation]}
    top = blob(layout, json.dumps(inner).encode(), INDEX,
               annotations={"io.containerd.image.name": name,
                            "org.opencontainers.image.ref.name": "latest"})
    written = {f"sha256:{path.name}" for path in (layout / "blobs" / "sha256").iterdir()}
    return Export([top], written | {layer})


def test_a_pulled_index_leads_to_this_platforms_image(tmp_path: Path) -> None:
    name = "docker.io/myorg/app:latest"
    exported = pulled_buildx_index(tmp_path, name)
    found = platform_manifests(tmp_path, exported, AMD64)
    assert list(found) == [name]
    assert found[name]["mediaType"] == MANIFEST
    assert found[name]["platform"] == {"architecture": "amd64", "os": "linux"}


def test_an_image_whose_layer_the_engine_did_not_export_is_not_used(tmp_path: Path) -> None:
    exported = pulled_buildx_index(tmp_path, "docker.io/myorg/app:latest")
    layer = next(digest for digest in exported.digests
                 if not (tmp_path / "blobs" / "sha256" / digest.split(":")[1]).exists())
    exported.digests.remove(layer)
    assert platform_manifests(tmp_path, exported, AMD64) == {}


def test_an_image_without_this_platform_is_not_used(tmp_path: Path) -> None:
    exported = pulled_buildx_index(tmp_path, "docker.io/myorg/app:latest")
    assert platform_manifests(tmp_path, exported, ("linux", "s390x")) == {}


def test_image_names_are_matched_in_the_containerd_stores_spelling() -> None:
    assert full_name("app") == "docker.io/library/app:latest"
    assert full_name("myorg/app:v1") == "docker.io/myorg/app:v1"
    assert full_name("docker.io/myorg/app:v1") == "docker.io/myorg/app:v1"
    assert full_name("127.0.0.1:5000/app-cache:main--latest") == (
        "127.0.0.1:5000/app-cache:main--latest"
    )


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
