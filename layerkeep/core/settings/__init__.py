"""One settings object, loaded once, from defaults, env files, the environment and flags.

Each setting is declared once, on its field of Settings (declarations); the loader
(loading, env_files, precedence), the settings view (view), the test environment's
templates (templates), the reference docs/settings.md (reference) and the task flags
derive from those declarations. What importers use is handed on here.
"""

from layerkeep.core.settings.declarations import FLAGS, KEYS, KNOWN, Key, Settings
from layerkeep.core.settings.env_files import read_env_file
from layerkeep.core.settings.loading import load_settings
from layerkeep.core.settings.parsers import BuildSecret, Mount, cli_variable_among
from layerkeep.core.settings.precedence import Source
from layerkeep.core.settings.secret_values import secret_build_args
from layerkeep.core.settings.templates import render_template
from layerkeep.core.settings.view import SettingRow, describe_settings

__all__ = [
    "FLAGS",
    "KEYS",
    "KNOWN",
    "BuildSecret",
    "Key",
    "Mount",
    "SettingRow",
    "Settings",
    "Source",
    "cli_variable_among",
    "describe_settings",
    "load_settings",
    "read_env_file",
    "render_template",
    "secret_build_args",
]
