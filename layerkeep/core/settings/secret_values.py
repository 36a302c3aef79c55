"""Which of the settings' values are secrets: what the masker hides, found at load time."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from layerkeep.core.secrets import is_secret_name
from layerkeep.core.service_specs import ServiceSpec
from layerkeep.core.settings.parsers import BuildSecret
from layerkeep.core.settings.precedence import Raw, Source

if TYPE_CHECKING:
    from layerkeep.core.settings.declarations import Settings


def collect(
    parsed: Mapping[str, Any], raw: Mapping[str, Raw], environ: Mapping[str, str]
) -> tuple[str, ...]:
    """The secret values among parsed settings (by field name) and the variables they name.

    Passwords, the values of variables listed in LAYERKEEP_SECRETS or LAYERKEEP_BUILD_SECRETS,
    and secret-named pairs of the test, build and service environments; longest first.
    """
    listed: tuple[str, ...] = parsed["secrets"]
    values = {parsed["registry_password"], parsed["db_password"]}
    values.update(environ[name] for name in listed if name in environ)
    secrets: tuple[BuildSecret, ...] = parsed["build_secrets"]
    values.update(environ[s.variable] for s in secrets if s.variable in environ)
    specs: tuple[ServiceSpec, ...] = parsed["services"]
    for env in (parsed["test_env"], parsed["build_args"], *(spec.env for spec in specs)):
        values.update(value for name, value in env.items() if is_secret_name(name, listed))
    values.discard("")
    # The built-in password is public (.env.example shows it), and masking it would
    # also mask "layerkeep" in every container name.
    if raw["LAYERKEEP_DB_PASSWORD"].source == Source.DEFAULT:
        values.discard(parsed["db_password"])
    return tuple(sorted(values, key=lambda value: (-len(value), value)))


def secret_build_args(settings: Settings) -> list[str]:
    """The build args that hold a secret: named so, listed, or a value that is masked."""
    return [
        name
        for name, value in settings.build_args.items()
        if value and (is_secret_name(name, settings.secrets) or value in settings.secret_values)
    ]
