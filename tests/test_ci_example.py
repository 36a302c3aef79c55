"""`inv ci` on the bundled example: real build, cache, postgres, redis and tests in the image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerkeep.core.engine import BUILD_ID_LABEL, Engine

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
PROJECT_TASKS = """\
from invoke.tasks import task

from layerkeep.tasks import ci_tasks, ns


@task
def announce(c):
    \"\"\"A project's own step inside `inv ci`.\"\"\"
    print("the project's own step ran")
    return "announced"


ci_tasks.add_step(announce, after="image.build")
"""
FAILING_TEST = """\
def test_this_one_fails():
    assert 1 + 1 == 3, "deliberately red"
"""


@dataclass
class ExampleProject:
    """A copy of the example in its own git repository, configured like the repo's .env."""

    root: Path
    image: str

    def environ(self, build_id: str, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "LAYERKEEP_IMAGE": self.image,
            "LAYERKEEP_BUILD_ID": build_id,
            "LAYERKEEP_CACHE_IMAGES": "",
            "LAYERKEEP_REPORTS_DIR": str(self.root / "reports" / build_id),
            **extra,
        }

    def ci(self, build_id: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "invoke", "ci"],
            cwd=self.root,
            env=self.environ(build_id, **extra),
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )


@pytest.fixture
def example(tmp_path: Path, engine: Engine, unique_repository: str) -> ExampleProject:
    root = tmp_path / "project"
    shutil.copytree(REPO / "example", root / "example")
    shutil.copy(REPO / ".env", root / ".env")
    (root / "tasks.py").write_text(PROJECT_TASKS)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run([*git, "-C", str(root), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(root), "commit", "-qm", "example"], check=True)
    return ExampleProject(root, f"{unique_repository}/shortener")


def leftovers(engine: Engine, build_id: str) -> list[str]:
    selector = {"label": f"{BUILD_ID_LABEL}={build_id}"}
    containers = [c["Names"][0] for c in engine.api.containers(all=True, filters=selector)]
    networks = [n["Name"] for n in engine.api.networks(filters=selector)]
    return containers + networks


def junit_cases(folder: Path) -> dict[str, str]:
    """Test case name -> outcome, from every JUnit file in ``folder``."""
    cases: dict[str, str] = {}
    for report in folder.glob("*.xml"):
        # Our own test run's report, not untrusted input.
        for case in ET.parse(report).getroot().iter("testcase"):  # noqa: S314
            failed = case.find("failure") is not None or case.find("error") is not None
            cases[case.attrib["name"]] = "failed" if failed else "passed"
    return cases


def summary_line(output: str, step: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(f"{step} "))


def test_cold_then_restored_run(example: ExampleProject, engine: Engine) -> None:
    build_id = f"t{uuid.uuid4().hex[:8]}"
    cold = example.ci(build_id)
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr
    cases = junit_cases(example.root / "reports" / build_id)
    assert len(cases) >= 6
    assert set(cases.values()) == {"passed"}
    assert leftovers(engine, build_id) == []
    assert "no cache: cold build" in summary_line(cold.stdout, "cache.load")
    steps = [line.split()[0] for line in cold.stdout.split("\nstep ")[-1].splitlines()[1:]]
    assert steps == [
        "git.touch", "cache.load", "image.build", "announce", "cache.save",
        "services.up", "db.init", "test.run", "services.down", "total",
    ]
    assert summary_line(cold.stdout, "announce").endswith("announced")

    # A fresh machine: no app image, no builder cache; only the cache folder survives.
    for tag in (example.image, f"{example.image}:latest-stage-builder"):
        engine.api.remove_image(tag, force=True)
    engine.api.prune_builds(all=True)
    warm = example.ci(build_id)

    assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr
    build_line = summary_line(warm.stdout, "image.build")
    reused, total = build_line.split()[4].split("/")
    assert reused == total
    assert int(total) >= 5
    assert "2 restored" in summary_line(warm.stdout, "cache.load")
    assert leftovers(engine, build_id) == []


def test_failing_tests_fail_the_job_and_clean_up(example: ExampleProject, engine: Engine) -> None:
    (example.root / "example" / "tests" / "test_red.py").write_text(FAILING_TEST)
    build_id = f"t{uuid.uuid4().hex[:8]}"

    done = example.ci(build_id)

    assert done.returncode == 1, done.stdout[-3000:]
    assert "layerkeep: tests failed (exit 1)" in done.stderr
    assert junit_cases(example.root / "reports" / build_id)["test_this_one_fails"] == "failed"
    assert summary_line(done.stdout, "test.run").split()[1] == "failed"
    assert summary_line(done.stdout, "services.down").split()[1] == "ok"
    # The cache was saved before the tests ran: a red run still leaves it warm.
    assert summary_line(done.stdout, "cache.save").split()[1] == "ok"
    assert (example.root / ".layerkeep-cache" / "manifest.json").is_file()
    assert leftovers(engine, build_id) == []


def test_two_jobs_at_once_on_one_engine(example: ExampleProject, engine: Engine) -> None:
    first = example.ci(f"t{uuid.uuid4().hex[:8]}")  # warm the image so both start alike
    assert first.returncode == 0, first.stdout[-3000:]
    ids = [f"t{uuid.uuid4().hex[:8]}" for _ in range(2)]
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "invoke", "ci"],
            cwd=example.root,
            env=example.environ(build_id),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for build_id in ids
    ]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]

    for job, output in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, output[-3000:]
    for build_id in ids:
        assert set(junit_cases(example.root / "reports" / build_id).values()) == {"passed"}
        assert leftovers(engine, build_id) == []
