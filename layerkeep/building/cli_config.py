"""A private ``DOCKER_CONFIG`` for the docker CLI a build runs: layerkeep's logins added.

BuildKit reads a registry cache (``--cache-from type=registry``) and writes one with the
CLI's credentials. layerkeep's own login for the cache registry (LAYERKEEP_REGISTRY_USER
and _PASSWORD) goes into a copy of the user's client config in a private folder, so the
user's own ``~/.docker`` is never written.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from layerkeep.core.registry_credentials import Credentials


def docker_config_with(
    logins: Mapping[str, Credentials], environ: Mapping[str, str], folder: Path
) -> dict[str, str]:
    """The CLI environment's ``DOCKER_CONFIG``: the user's own config with these logins
    added (they win over a credential store for their hosts), and the user's CLI plugins
    (buildx) still found. ``folder`` must not exist; it is made private (0700)."""
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
