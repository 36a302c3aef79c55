"""The settings reference, docs/settings.md, written from the declarations.

Every key with its task flag, default and meaning, in the sections the declarations open
(``heading=``), then the keys each service takes. Regenerate it after changing a
declaration: ``python -m layerkeep.core.settings.reference > docs/settings.md`` (a test
fails while it is out of date).
"""

from __future__ import annotations

import sys
from itertools import groupby

from layerkeep.core.service_specs import SERVICE_KEYS
from layerkeep.core.settings.declarations import KEYS, PREFIX
from layerkeep.core.settings.env_files import ENV_FILES, ENV_FILES_KEY

COMMAND = "python -m layerkeep.core.settings.reference > docs/settings.md"


def reference() -> str:
    """docs/settings.md as the declarations make it."""
    files = " < ".join(f"`{name}`" for name in ENV_FILES)
    lines = [
        "# Settings",
        "",
        f"<!-- Made from layerkeep/core/settings/declarations.py by: {COMMAND} -->",
        "",
        f"Each setting is a `{PREFIX}` variable. Env files set them ({files},",
        f"later files winning; or the comma-separated list in `{ENV_FILES_KEY}`), the",
        "process environment wins over the files, and a task flag sets its setting for every",
        "task of one command, over everything else. `.env.example` lists every key with",
        "longer notes; `inv settings --all-keys` shows the values a command runs with and",
        "where each came from.",
    ]
    for section, keys in groupby(KEYS, key=lambda key: key.section):
        lines += ["", f"## {section}", "", "| Key | Flag | Default | Meaning |", "|---" * 4 + "|"]
        lines += [
            _row(f"`{key.name}`", _code(key.flag), _code(key.default), key.doc) for key in keys
        ]
    lines += [
        "",
        "## Each service's keys",
        "",
        f"A service named in `{PREFIX}SERVICES` is described by `{PREFIX}<NAME>_<KEY>`",
        "(`-` in its name becomes `_`); postgres and redis are known kinds, with defaults.",
        "",
        "| Key | Meaning |",
        "|---" * 2 + "|",
    ]
    lines += [f"| `{PREFIX}<NAME>_{key.suffix}` | {_cell(key.doc)} |" for key in SERVICE_KEYS]
    return "\n".join(lines) + "\n"


def _row(*cells: str) -> str:
    return "| " + " | ".join(_cell(cell) for cell in cells) + " |"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


if __name__ == "__main__":
    sys.stdout.write(reference())
