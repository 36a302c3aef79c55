"""`inv ci` on the bundled example: real build, cache, postgres, redis and tests in the image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import machines
import pytest
from bundled_example import committed_example
from clean_env import clean_environ

from layerkeep.core.engine import Engine
from layerkeep.core.job import BUILD_ID_LABEL

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
# What a fresh CI machine pulls before it has any cache: the example's base and services.
BASE_IMAGES = ("python:3.11-slim", "postgres:15", "redis:7")
Machine = tuple[Engine, dict[str, str]]
PROJECT_TASKS = """\
from invoke.tasks import task

from layerkeep.tasks import collection


@task
def announce(c):
    \"\"\"A project's own step inside `inv ci`.\"\"\"
    print("the project's own step ran")
    return "announced"


ns = collection(steps=[(announce, "image.build")])
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
        return clean_environ(
            LAYERKEEP_IMAGE=self.image,
            LAYERKEEP_BUILD_ID=build_id,
            LAYERKEEP_CACHE_IMAGES="",
            LAYERKEEP_REPORTS_DIR=str(self.root / "reports" / build_id),
            **extra,
        )

    def ci(self, build_id: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.inv("ci", build_id=build_id, **extra)

    def inv(self, *args: str, build_id: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "invoke", *args],
            cwd=self.root,
            env=self.environ(build_id, **extra),
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )


@pytest.fixture
def example(tmp_path: Path, engine: Engine, unique_repository: str) -> ExampleProject:
    root = committed_example(tmp_path / "project", tasks=PROJECT_TASKS)
    return ExampleProject(root, f"{unique_repository}/shortener")


def leftovers(engine: Engine, build_id: str) -> list[str]:
    selector = [f"{BUILD_ID_LABEL}={build_id}"]
    containers = [c["Names"][0] for c in engine.list_containers(selector)]
    networks = [n["Name"] for n in engine.list_networks(selector)]
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


def summary_line(output: str, task: str) -> str:
    table = output.rsplit("\ntask ", 1)[-1]
    return next(line for line in table.splitlines() if line.startswith(f"{task} "))


def result_of(output: str, task: str) -> str:
    """The result column of ``task``'s row (a cleanup row says "(cleanup)" first)."""
    words = summary_line(output, task).split()
    return words[2] if words[1] == "(cleanup)" else words[1]


def wait_for_running(engine: Engine, build_id: str, purpose: str) -> None:
    """Poll until the job's container for ``purpose`` runs (at most a minute)."""
    selector = [f"{BUILD_ID_LABEL}={build_id}", f"io.layerkeep.purpose={purpose}"]
    deadline = time.monotonic() + 60
    while not any(c["State"] == "running" for c in engine.list_containers(selector)):
        assert time.monotonic() < deadline, f"no running {purpose} container of {build_id}"
        time.sleep(0.1)


def summary_tasks(output: str) -> list[str]:
    return [line.split()[0] for line in output.rsplit("\ntask ", 1)[-1].splitlines()[1:]]


def fresh_machine(folder: Path, kind: str = "20.10") -> AbstractContextManager[Machine]:
    """Another machine with the base images a CI job pulls (see machines.py)."""
    return machines.fresh_machine(folder, kind, images=BASE_IMAGES)


def test_cold_then_restored_run(example: ExampleProject, engine: Engine) -> None:
    build_id = f"t{uuid.uuid4().hex[:8]}"
    cold = example.ci(build_id)
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr
    cases = junit_cases(example.root / "reports" / build_id)
    assert len(cases) >= 6
    assert set(cases.values()) == {"passed"}
    assert leftovers(engine, build_id) == []
    assert "no cache: cold build" in summary_line(cold.stdout, "cache.load")
    assert summary_tasks(cold.stdout) == [
        "git.touch", "cache.load", "image.build", "announce", "cache.save",
        "services.up", "db.init", "test.run", "services.down", "release.push", "total",
    ]
    assert summary_line(cold.stdout, "announce").endswith("announced")
    assert summary_line(cold.stdout, "release.push").split()[1] == "skipped"

    with fresh_machine(example.root.parent / "machine") as (other, environ):
        warm = example.ci(build_id, **environ)
        assert leftovers(other, build_id) == []

    assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr
    build_line = summary_line(warm.stdout, "image.build")
    reused, total = build_line.split()[4].split("/")
    assert reused == total
    assert int(total) >= 5
    assert summary_line(warm.stdout, "cache.load").split()[4:6] == ["2", "restored"]
    assert set(junit_cases(example.root / "reports" / build_id).values()) == {"passed"}


@pytest.mark.private_engines
@pytest.mark.parametrize("kind", ["26-classic", "26-containerd"])
def test_inv_ci_on_docker_26_cold_then_on_another_fresh_machine(
    example: ExampleProject, kind: str
) -> None:
    """The whole job on the engines users run: Docker 26 with buildx, both image stores."""
    build_id = f"t{uuid.uuid4().hex[:8]}"
    with fresh_machine(example.root.parent / "first", kind) as (first, environ):
        cold = example.ci(build_id, **environ)
        assert leftovers(first, build_id) == []
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr
    assert "(buildkit)" in summary_line(cold.stdout, "image.build")
    assert set(junit_cases(example.root / "reports" / build_id).values()) == {"passed"}

    with fresh_machine(example.root.parent / "second", kind) as (second, environ):
        warm = example.ci(build_id, **environ)
        assert leftovers(second, build_id) == []

    assert warm.returncode == 0, warm.stdout[-3000:] + warm.stderr
    reused, total = summary_line(warm.stdout, "image.build").split()[4].split("/")
    assert reused == total
    assert int(total) >= 5
    loaded = summary_line(warm.stdout, "cache.load")
    if kind == "26-containerd":  # BuildKit's own cache export, read by the build
        assert "the app's cache is BuildKit's" in loaded
        assert "BuildKit cache" in summary_line(warm.stdout, "cache.save")
    else:
        assert loaded.split()[4:6] == ["2", "restored"]
    assert set(junit_cases(example.root / "reports" / build_id).values()) == {"passed"}


def test_test_run_alone_does_its_part_of_the_job(
    example: ExampleProject, engine: Engine
) -> None:
    """A developer's `inv test.run` on a fresh clone: restore, build, services, db, tests."""
    build_id = f"t{uuid.uuid4().hex[:8]}"
    cold = example.ci(build_id)
    assert cold.returncode == 0, cold.stdout[-3000:] + cold.stderr

    with fresh_machine(example.root.parent / "machine") as (other, environ):
        done = example.inv("test.run", build_id=build_id, **environ)
        assert leftovers(other, build_id) == []

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert summary_tasks(done.stdout) == [
        "git.touch", "cache.load", "image.build", "services.up", "db.init", "test.run",
        "services.down", "total",
    ]
    reused, total = summary_line(done.stdout, "image.build").split()[4].split("/")
    assert reused == total
    assert set(junit_cases(example.root / "reports" / build_id).values()) == {"passed"}
    assert leftovers(engine, build_id) == []


def test_failing_tests_fail_the_job_and_clean_up(example: ExampleProject, engine: Engine) -> None:
    (example.root / "example" / "tests" / "test_red.py").write_text(FAILING_TEST)
    build_id = f"t{uuid.uuid4().hex[:8]}"

    done = example.ci(build_id)

    assert done.returncode == 1, done.stdout[-3000:]
    assert "layerkeep: test.run: tests failed (exit 1)" in done.stderr
    assert junit_cases(example.root / "reports" / build_id)["test_this_one_fails"] == "failed"
    assert result_of(done.stdout, "test.run") == "failed"
    assert result_of(done.stdout, "services.down") == "ok"
    assert result_of(done.stdout, "release.push") == "not"  # not run
    # The cache was saved before the tests ran: a red run still leaves it warm.
    assert result_of(done.stdout, "cache.save") == "ok"
    assert (example.root / ".layerkeep-cache" / "manifest.json").is_file()
    assert leftovers(engine, build_id) == []


def test_two_jobs_without_build_ids_both_pass(example: ExampleProject, engine: Engine) -> None:
    """No CI variables, no LAYERKEEP_BUILD_ID: the second run takes its own id."""
    project = f"twins-{uuid.uuid4().hex[:8]}"
    warm = example.ci(f"t{uuid.uuid4().hex[:8]}")  # the image, so both start alike
    assert warm.returncode == 0, warm.stdout[-3000:]
    environ = {
        key: value
        for key, value in example.environ("unused", LAYERKEEP_PROJECT=project).items()
        if key != "LAYERKEEP_BUILD_ID"
    }
    environ["LAYERKEEP_REPORTS_DIR"] = str(example.root / "reports" / project)
    jobs = [
        subprocess.Popen(
            [sys.executable, "-m", "invoke", "ci"],
            cwd=example.root,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [job.communicate(timeout=900)[0] for job in jobs]

    for job, output in zip(jobs, outputs, strict=True):
        assert job.returncode == 0, output[-3000:]
    assert sum("this run uses 'local-2'" in output for output in outputs) == 1
    for build_id in ("local", "local-2"):
        selector = [f"io.layerkeep.project={project}", f"{BUILD_ID_LABEL}={build_id}"]
        assert engine.list_containers(selector) == []
        assert engine.list_networks(selector) == []


def test_sigterm_during_the_tests_leaves_nothing_behind(
    example: ExampleProject, engine: Engine
) -> None:
    build_id = f"t{uuid.uuid4().hex[:8]}"
    job = subprocess.Popen(
        [sys.executable, "-m", "invoke", "test.run"],
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
    # The signal lands while the tests' container runs (`sleep 300`).
    wait_for_running(engine, build_id, "tests")
    job.send_signal(signal.SIGTERM)
    rest, errors = job.communicate(timeout=120)
    output = "".join(seen) + rest

    assert job.returncode == 143, output[-3000:] + errors
    assert "layerkeep: test.run: interrupted by SIGTERM" in errors
    assert result_of(output, "services.down") == "ok"
    assert leftovers(engine, build_id) == []


def test_dry_ci_changes_nothing(example: ExampleProject, engine: Engine) -> None:
    build_id = f"t{uuid.uuid4().hex[:8]}"
    tracked = example.root / "example" / "Dockerfile"
    os.utime(tracked, (1_000_000_000, 1_000_000_000))

    done = example.inv("--dry", "ci", build_id=build_id)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "dry run, nothing is changed; plan: git.touch -> cache.load -> image.build" in (
        done.stdout
    )
    assert f"would build {example.image}:latest" in done.stdout
    assert "would start postgres (postgres:15)" in done.stdout
    assert tracked.stat().st_mtime == 1_000_000_000
    assert not (example.root / ".layerkeep-cache").exists()
    assert not (example.root / "reports" / build_id).exists()
    # Other test runs may share the engine: look at what this job would have made.
    assert engine.image_id(f"{example.image}:latest") is None
    assert engine.image_id(f"{example.image}:latest-stage-builder") is None
    assert leftovers(engine, build_id) == []
