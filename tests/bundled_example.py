"""A copy of the bundled example (``example/`` and ``layerkeep.env``), committed in a
git repository of its own, as a project that uses layerkeep is."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ONE_LINE_TASKS = "from layerkeep.tasks import ns\n"


def committed_example(root: Path, *, tasks: str = ONE_LINE_TASKS) -> Path:
    """Copy the example into ``root`` with ``tasks`` as its tasks.py and commit it."""
    shutil.copytree(REPO / "example", root / "example")
    shutil.copy(REPO / "layerkeep.env", root / "layerkeep.env")
    (root / "tasks.py").write_text(tasks)
    (root / ".gitignore").write_text("cache/\nreports/\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "example"], check=True)
    return root
