"""Command lines naming several tasks, on the bundled example and the real engine.

Each task of a command runs once, with one summary, however the tasks are named; a
flag given to one task holds for its prerequisites; a failure or SIGTERM cleans up once.
The same behaviours on small tasks without an engine are in test_graph.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bundled_example import committed_example
from clean_env import clean_environ
from conftest import TEST_REPOSITORY, remove_test_images

from layerkeep.core.engine import Engine
from layerkeep.core.job import BUILD_ID_LABEL

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
INV = [sys.executable, "-m", "invoke"]


@dataclass
class Example:
    """A copy of the example, configured like the repository's layerkeep.env, with its own image."""

    root: Path
    image: str

    def environ(self, build_id: str, **extra: str) -> dict[str, str]:
        return clean_environ(
            LAYERKEEP_IMAGE=self.image,
            LAYERKEEP_BUILD_ID=build_id,
            LAYERKEEP_CACHE_IMAGES="",
            LAYERKEEP_CACHE_DIR=str(self.root / "cache" / build_id),
            LAYERKEEP_REPORTS_DIR=str(self.root / "reports" / build_id),
            **extra,
        )

    def inv(self, *args: str, build_id: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*INV, *args], cwd=self.root, env=self.environ(build_id, **extra),
            capture_output=True, text=True, check=False, timeout=900,
        )

    def report(self, build_id: str) -> dict[str, Any]:
        path = self.root / "reports" / build_id / "layerkeep-report.json"
        document: dict[str, Any] = json.loads(path.read_text())
        return document


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Iterator[Example]:
    """One project for the module: its image builds once, later builds are cached."""
    root = committed_example(tmp_path_factory.mktemp("graph") / "project")
    repository = f"{TEST_REPOSITORY}/{uuid.uuid4().hex[:10]}"
    yield Example(root, f"{repository}/shortener")
    remove_test_images(engine, repository)


# What `inv image.build test.run` runs, in order.
BUILD_AND_TEST = [
    "git.touch", "cache.load", "image.build", "services.up", "db.init", "test.run",
    "services.down",
]


def new_build_id() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def leftovers(engine: Engine, build_id: str) -> list[str]:
    selector = [f"{BUILD_ID_LABEL}={build_id}"]
    containers = [c["Names"][0] for c in engine.list_containers(selector)]
    networks = [n["Name"] for n in engine.list_networks(selector)]
    return containers + networks


def summary_tasks(output: str) -> list[str]:
    return [line.split()[0] for line in output.rsplit("\ntask ", 1)[-1].splitlines()[1:-1]]


def started(output: str) -> list[str]:
    """The tasks in the order they started (their "==> task" lines)."""
    return [line.removeprefix("==> ") for line in output.splitlines() if line.startswith("==> ")]


@pytest.mark.parametrize(
    ("command", "tasks"),
    [
        (["image.build", "test.run"], BUILD_AND_TEST),
        (
            ["cache.load", "image.build", "cache.save"],
            ["cache.load", "git.touch", "image.build", "cache.save"],
        ),
        (
            ["services.up", "test.run"],
            ["cache.load", "services.up", "git.touch", "image.build", "db.init", "test.run",
             "services.down"],
        ),
    ],
)
def test_a_command_naming_several_tasks_runs_each_once(
    example: Example, engine: Engine, command: list[str], tasks: list[str]
) -> None:
    build_id = new_build_id()
    done = example.inv(*command, build_id=build_id)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert started(done.stdout) == tasks
    assert done.stdout.count("\ntask ") == 1, done.stdout[-3000:]
    assert summary_tasks(done.stdout) == tasks
    assert [task["name"] for task in example.report(build_id)["tasks"]] == tasks
    assert leftovers(engine, build_id) == []


def test_an_image_flag_reaches_cache_load_and_cache_save(
    example: Example, engine: Engine
) -> None:
    """`inv image.build --image X` restores X: the flag holds for every task of it."""
    flagged = f"{example.image}-flagged"
    build_id = new_build_id()
    saved = example.inv("image.build", "--image", flagged, "cache.save", build_id=build_id)
    assert saved.returncode == 0, saved.stdout[-3000:] + saved.stderr
    figures = {t["name"]: t["figures"] for t in example.report(build_id)["tasks"]}
    assert f"{flagged}:latest" in figures["cache.save"]["saved"]
    for tag in ("latest", "latest-stage-builder"):
        assert engine.remove_image(f"{flagged}:{tag}", force=True)

    again = example.inv("image.build", "--image", flagged, build_id=build_id)

    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    figures = {t["name"]: t["figures"] for t in example.report(build_id)["tasks"]}
    # Restored, or present when the engine still had its layers under the example's own
    # tags (the same build): either way cache.load looked for the flag's image.
    loaded = figures["cache.load"]["restored"] + figures["cache.load"]["present"]
    assert f"{flagged}:latest" in loaded
    assert f"{example.image}:latest" not in loaded
    assert engine.image_id(f"{flagged}:latest") is not None


def test_failing_tests_clean_up_once(example: Example, engine: Engine) -> None:
    build_id = new_build_id()
    done = example.inv(
        "image.build", "test.run", build_id=build_id, LAYERKEEP_TEST_COMMAND="exit 3"
    )
    assert done.returncode == 3, done.stdout[-3000:] + done.stderr
    assert done.stderr.startswith("layerkeep: test.run: tests failed (exit 3)")
    assert started(done.stdout) == [*BUILD_AND_TEST[:-1], "services.down (cleanup)"]
    assert done.stdout.count("\ntask ") == 1
    assert leftovers(engine, build_id) == []


def test_sigterm_during_a_command_of_several_tasks_cleans_up_once(
    example: Example, engine: Engine
) -> None:
    build_id = new_build_id()
    job = subprocess.Popen(
        [*INV, "image.build", "test.run"],
        cwd=example.root,
        env=example.environ(build_id, LAYERKEEP_TEST_COMMAND="sleep 300"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert job.stdout is not None
    seen: list[str] = []
    for line in job.stdout:
        seen.append(line)
        if line.startswith("running tests in "):
            break
    assert seen, "the job printed nothing"
    assert seen[-1].startswith("running tests in "), "".join(seen)[-3000:]
    job.send_signal(signal.SIGTERM)
    rest, errors = job.communicate(timeout=120)
    output = "".join(seen) + rest

    assert job.returncode == 143, output[-3000:] + errors
    assert errors == "layerkeep: test.run: interrupted by SIGTERM\n"
    assert started(output) == [*BUILD_AND_TEST[:-1], "services.down (cleanup)"]
    assert output.count("\ntask ") == 1
    assert leftovers(engine, build_id) == []
