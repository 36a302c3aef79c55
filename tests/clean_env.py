"""The environment tests give the `inv` processes they start: no CI, no settings of ours.

A CI's variables change the build id, the commit and the reports folder; a developer's
own LAYERKEEP_* or INVOKE_* variables change settings and Invoke's config. Tests that
start `inv` pass this instead of ``os.environ``, plus what they set themselves.
"""

from __future__ import annotations

import os

_LEFT_OUT = ("GITHUB_", "CIRCLE", "GITLAB", "CI_", "LAYERKEEP_", "INVOKE_")


def clean_environ(**extra: str) -> dict[str, str]:
    """``os.environ`` without CI, layerkeep and Invoke variables, then ``extra``."""
    kept = {
        key: value
        for key, value in os.environ.items()
        if key != "CI" and not key.startswith(_LEFT_OUT)
    }
    return {**kept, **extra}
