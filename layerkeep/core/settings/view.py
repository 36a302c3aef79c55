"""The settings view: every resolved setting, its value (secrets masked), origin and doc."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from layerkeep.core.secrets import MASK, Masker, is_secret_name
from layerkeep.core.service_specs import SERVICE_KEYS, ServiceSpec, service_key
from layerkeep.core.settings.declarations import KEYS, Settings
from layerkeep.core.settings.parsers import Mount


class SettingRow(NamedTuple):
    """One line of the settings view."""

    name: str
    value: str
    origin: str
    doc: str


def describe_settings(settings: Settings) -> list[SettingRow]:
    """Every resolved setting, with secrets masked, where it came from, and what it means.

    The declared settings come first, in declaration order, then the keys of each
    configured service.
    """
    masker = settings.masker
    rows: list[SettingRow] = []
    for key in KEYS:
        value = getattr(settings, key.field)
        if key.secret:
            text = MASK if value else ""
        elif isinstance(value, Mapping):
            text = _show_pairs(value, settings.secrets, masker)
        else:
            text = masker.mask(_show(value))
        rows.append(SettingRow(key.name, text, settings.origins.get(key.name, "default"), key.doc))
    for spec in settings.services:
        shown = {
            "IMAGE": spec.image,
            "KIND": spec.kind,
            "ENV": _show_pairs(spec.env, settings.secrets, masker),
            "COMMAND": masker.mask(spec.command),
            "READY": masker.mask(spec.ready),
            "CONTAINER_PORT": _show(spec.container_port),
            "PORT": _show(spec.host_port),
            "TIMEOUT": f"{spec.timeout:g}",
        }
        for service_setting in SERVICE_KEYS:
            name = service_key(spec.name, service_setting.suffix)
            origin = settings.origins.get(name, "default")
            rows.append(
                SettingRow(name, shown[service_setting.suffix], origin, service_setting.doc)
            )
    return rows


def _show_pairs(pairs: Mapping[str, str], listed: tuple[str, ...], masker: Masker) -> str:
    def shown(name: str, value: str) -> str:
        return MASK if is_secret_name(name, listed) else masker.mask(value)

    return ",".join(f"{name}={shown(name, value)}" for name, value in pairs.items())


def _show(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(_show(item) for item in value)
    if isinstance(value, Mount):
        return f"{value.source}:{value.target}{':ro' if value.read_only else ''}"
    if isinstance(value, ServiceSpec):
        return value.name
    return str(value)

