"""The package's areas import only downwards: core < git, building, standins < cache <
services < testrun < release < the run's own modules (preflight, dryrun) < tasks.

A source scan: each ``from layerkeep.<area> import`` is checked against the importing
area's floor, so an import that would make a cycle (or tie two areas of one floor
together) fails here before it fails at import time.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "layerkeep"
FLOORS = {
    "core": 0,
    "git": 1, "building": 1, "standins": 1,
    "cache": 2,
    "services": 3,
    "testrun": 4,
    "release": 5,
    "preflight": 6, "dryrun": 6,
    "tasks": 7,
}


def area_of(path: Path) -> str:
    """``layerkeep/cache/store.py`` -> ``cache``; ``layerkeep/dryrun.py`` -> ``dryrun``."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def imported_areas(path: Path) -> set[str]:
    """The layerkeep areas ``path`` imports from."""
    areas = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        areas |= {n.split(".")[1] for n in names if n.startswith("layerkeep.") and "." in n}
    return areas


def test_every_module_belongs_to_a_known_area() -> None:
    unknown = {area_of(path) for path in PACKAGE.rglob("*.py")} - set(FLOORS) - {"__init__"}
    assert not unknown, f"add {sorted(unknown)} to FLOORS"


def test_areas_import_only_from_lower_floors() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        area = area_of(path)
        if area == "__init__":
            continue
        for target in imported_areas(path) - {area}:
            if FLOORS[target] >= FLOORS[area]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports layerkeep.{target}")
    assert not wrong, wrong


def test_the_scan_sees_an_upward_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import layerkeep.cache.store\nfrom layerkeep.release import push\n")
    assert imported_areas(sample) == {"cache", "release"}
