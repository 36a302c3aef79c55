"""The registry login `docker login` stored, read as docker-py hands it to the engine."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import docker.auth
import docker.errors

from layerkeep.core.engine.translation import translate
from layerkeep.core.errors import DockerOperationError


def docker_login(registry: str, environ: Mapping[str, str]) -> tuple[str, str] | None:
    """The user and password `docker login` stored for ``registry``, or None.

    Read from ``$DOCKER_CONFIG/config.json`` (else ``~/.docker/config.json``) by docker-py's
    reader, the one that hands the engine our login on push and pull when no user is set:
    the same host matching, the same credential helpers (``credsStore``, ``credHelpers``).
    """
    folder = environ.get("DOCKER_CONFIG")
    home = Path(environ.get("HOME") or Path.home())
    path = Path(folder) / "config.json" if folder else home / ".docker" / "config.json"
    if not path.is_file():
        return None
    action = f"read the docker login for {registry} from {path}"
    try:
        with warnings.catch_warnings():
            # docker-py warns of a missing helper, then raises: the error says it.
            warnings.simplefilter("ignore")
            config = docker.auth.load_config(str(path), credstore_env=dict(environ))
            found = docker.auth.resolve_authconfig(config, registry) or {}
    except docker.errors.DockerException as error:
        raise translate(error, action=action) from None
    if "IdentityToken" in found:
        raise DockerOperationError(
            f"{action} failed: it is an identity token, which layerkeep cannot use",
            hint="set LAYERKEEP_REGISTRY_USER and LAYERKEEP_REGISTRY_PASSWORD",
        )
    # Entries of `auths` are lowercase, a helper's answer capitalised.
    user = found.get("username") or found.get("Username")
    password = found.get("password") or found.get("Password") or ""
    return (str(user), str(password)) if user else None
