"""Split test runs on the real engine: real pytest in an image, JUnit read back.

Every way of splitting (N local containers at once, or N CI nodes each run alone) runs
the full run's test cases once each; after one timed run the nodes' shares balance;
``--nodes 2`` on the bundled example gives each node its own database and redis number.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from bundled_example import committed_example
from clean_env import clean_environ
from conftest import TEST_REPOSITORY, remove_test_images

from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.job import BUILD_ID_LABEL, Job
from layerkeep.core.settings import Settings, load_settings
from layerkeep.testrun import run as testrun
from layerkeep.testrun.run import run_tests
from layerkeep.testrun.split import file_weights, find_test_files, split_files
from layerkeep.testrun.timing_store import TIMINGS_FILE

pytestmark = pytest.mark.docker
REPO = Path(__file__).resolve().parent.parent
PYTEST_DOCKERFILE = "FROM python:3.11-slim\nRUN pip install --no-cache-dir pytest==8.3.3\n"
COMMAND = "python -m pytest -q -p no:cacheprovider --junitxml=/reports/junit.xml"


@pytest.fixture(scope="module")
def pytest_image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """python:3.11-slim with pytest: the app image of the suites below."""
    repository = f"{TEST_REPOSITORY}/{uuid.uuid4().hex[:10]}"
    folder = tmp_path_factory.mktemp("pytest-image")
    (folder / "Dockerfile").write_text(PYTEST_DOCKERFILE)
    image = f"{repository}/pytest:1"
    engine.build(folder, tag=image)
    yield image
    remove_test_images(engine, repository)


def write_suite(root: Path, files: Mapping[str, str]) -> None:
    for name, text in files.items():
        path = root / "tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def settings_for(root: Path, image: str, **environ: str) -> Settings:
    return load_settings(
        root,
        {
            "LAYERKEEP_IMAGE": image,
            "LAYERKEEP_PROJECT": "nodes-test",
            "LAYERKEEP_BUILD_ID": uuid.uuid4().hex[:10],
            "LAYERKEEP_TEST_MOUNTS": "tests:/work/tests:ro",
            "LAYERKEEP_TEST_WORKDIR": "/work",
            "LAYERKEEP_TEST_COMMAND": COMMAND,
            "LAYERKEEP_CACHE_DIR": "cache",
            **environ,
        },
        git_facts=lambda _: GitFacts("", ""),
    )


def run(engine: Engine, settings: Settings) -> testrun.TestResult:
    lines: list[str] = []
    result = run_tests(engine.for_job(Job.from_settings(settings)), settings, log=lines.append)
    assert result.passed, "\n".join(lines[-40:])
    return result


def cases_in(reports: tuple[Path, ...]) -> list[str]:
    """Every testcase the reports name, as classname::name."""
    return [
        f"{case.get('classname')}::{case.get('name')}"
        for report in reports
        for case in ET.parse(report).getroot().iter("testcase")  # noqa: S314 - ours
    ]


# Files of 1 to 5 test cases: plain functions, a class, parametrized cases, a subfolder.
MIXED_SUITE = {
    "test_one.py": "def test_a():\n    pass\n",
    "test_params.py": (
        "import pytest\n\n@pytest.mark.parametrize('n', range(5))\n"
        "def test_n(n):\n    assert n < 5\n"
    ),
    "test_class.py": (
        "class TestThings:\n    def test_x(self):\n        pass\n\n"
        "    def test_y(self):\n        pass\n"
    ),
    "sub/test_deep.py": "def test_deep():\n    pass\n\ndef test_deeper():\n    pass\n",
    **{f"test_more_{n}.py": "def test_m():\n    pass\n" * 1 for n in range(5)},
}


def test_the_nodes_run_the_full_runs_cases_once_each(
    engine: Engine, pytest_image: str, tmp_path: Path
) -> None:
    write_suite(tmp_path, MIXED_SUITE)
    whole = run(engine, settings_for(tmp_path, pytest_image,
                                     LAYERKEEP_TEST_COMMAND=f"{COMMAND} tests"))
    full = cases_in(whole.reports)
    assert len(full) == len(set(full)) == 15
    for nodes in (1, 2, 3, 4):
        local = run(engine, settings_for(
            tmp_path, pytest_image, LAYERKEEP_TEST_FILES="tests/**/test_*.py",
            LAYERKEEP_TEST_NODES=str(nodes), LAYERKEEP_COMMIT=f"{nodes}a1a1a1",
        ))
        cases = cases_in(local.reports)
        assert Counter(cases) == Counter(full), nodes
        assert len(local.nodes) == nodes
        if nodes > 1:
            assert sorted(path.name for path in local.reports) == [
                f"junit-node{k}.xml" for k in range(1, nodes + 1)]
        # As CI nodes, each run alone with its own plan, one after the other on one
        # cache folder: each saves its timings before the next one plans.
        ci_cases: list[str] = []
        for index in range(1, nodes + 1):
            alone = run(engine, settings_for(
                tmp_path, pytest_image, LAYERKEEP_TEST_FILES="tests/**/test_*.py",
                LAYERKEEP_NODE_INDEX=str(index), LAYERKEEP_NODE_TOTAL=str(nodes),
                LAYERKEEP_COMMIT=f"{nodes}b2b2b2",
                LAYERKEEP_REPORTS_DIR=f"ci-reports/{nodes}-{index}",
            ))
            assert alone.split.startswith("timings of ")
            assert alone.timings_saved
            ci_cases += cases_in(alone.reports)
        assert Counter(ci_cases) == Counter(full), nodes


# Seconds each file sleeps: uneven. The fastest file is by far the largest, so that a
# split by size alone gives it a node of its own and the rest to the others.
SLEEPS = {"test_a.py": 1.0, "test_b.py": 0.8, "test_c.py": 0.6, "test_d.py": 0.5,
          "test_e.py": 0.4, "test_f.py": 0.3, "test_g.py": 0.3, "test_h.py": 0.2,
          "test_i.py": 0.2, "test_j.py": 0.1, "test_k.py": 0.1, "test_l.py": 0.1}


def sleeping_suite() -> dict[str, str]:
    suite = {}
    for name, seconds in SLEEPS.items():
        padding = "#" * (60_000 if name == "test_l.py" else 100) + "\n"
        half = seconds / 2
        suite[name] = (
            f"import time\n{padding}def test_first():\n    time.sleep({half})\n\n"
            f"def test_second():\n    time.sleep({half})\n"
        )
    return suite


def junit_seconds(report: Path) -> float:
    root = ET.parse(report).getroot()  # noqa: S314 - ours
    return sum(float(case.get("time", "0")) for case in root.iter("testcase"))


@pytest.mark.parametrize("nodes", [2, 3])
def test_after_one_timed_run_the_nodes_take_about_the_same_time(
    engine: Engine, pytest_image: str, tmp_path: Path, nodes: int
) -> None:
    write_suite(tmp_path, sleeping_suite())
    environ = {"LAYERKEEP_TEST_FILES": "tests/test_*.py"}
    files = find_test_files(settings_for(tmp_path, pytest_image, **environ))
    total = sum(SLEEPS.values())
    by_size = split_files(file_weights(files, {})[0], nodes)
    slowest_by_size = max(sum(SLEEPS[name.split("/")[-1]] for name in share)
                          for share in by_size)
    assert slowest_by_size > 1.2 * total / nodes, "the suite must defeat a split by size"

    timed = run(engine, settings_for(tmp_path, pytest_image, **environ))
    assert timed.timings_saved
    history = json.loads((tmp_path / "cache" / TIMINGS_FILE).read_text())["files"]
    assert sorted(history) == sorted(f"tests/{name}" for name in SLEEPS)
    split = run(engine, settings_for(tmp_path, pytest_image, LAYERKEEP_TEST_NODES=str(nodes),
                                     **environ))
    assert split.split.startswith("timings of 12/12 files (")
    per_node = [junit_seconds(report) for report in split.reports]
    assert len(per_node) == nodes
    measured = sum(per_node)
    assert max(per_node) <= 1.2 * measured / nodes, per_node


def test_a_node_with_an_empty_share_passes_and_says_so(
    engine: Engine, pytest_image: str, tmp_path: Path
) -> None:
    write_suite(tmp_path, {"test_only.py": "def test_a():\n    pass\n"})
    lines: list[str] = []
    settings = settings_for(tmp_path, pytest_image, LAYERKEEP_TEST_FILES="tests/*.py",
                            LAYERKEEP_NODE_INDEX="2", LAYERKEEP_NODE_TOTAL="2")
    result = run_tests(engine.for_job(Job.from_settings(settings)), settings, log=lines.append)
    assert result.passed
    assert result.reports == ()
    assert result.note() == "node 2/2: no test files in its share, nothing to run"
    assert "node 2/2: no test files in its share, nothing to run" in lines
    assert not any(line.startswith("running tests in") for line in lines)


def test_a_failing_node_fails_the_run_and_the_others_still_report(
    engine: Engine, pytest_image: str, tmp_path: Path
) -> None:
    write_suite(tmp_path, {"test_good.py": "def test_a():\n    pass\n",
                           "test_bad.py": "def test_b():\n    assert False\n"})
    settings = settings_for(tmp_path, pytest_image, LAYERKEEP_TEST_FILES="tests/*.py",
                            LAYERKEEP_TEST_NODES="2")
    result = run_tests(engine.for_job(Job.from_settings(settings)), settings, log=lambda _: None)
    assert result.exit_code == 1
    assert sorted(path.name for path in result.reports) == ["junit-node1.xml", "junit-node2.xml"]
    assert (result.counts.passed, result.counts.failed) == (1, 1)
    assert result.note().startswith("node 1/2: 1 tests, ")
    job = Job.from_settings(settings)
    assert engine.list_containers([f"{BUILD_ID_LABEL}={job.build_id}"]) == []


def test_a_command_that_names_its_tests_is_warned_about(
    engine: Engine, pytest_image: str, tmp_path: Path
) -> None:
    write_suite(tmp_path, {"test_a.py": "def test_a():\n    pass\n",
                           "test_b.py": "def test_b():\n    pass\n"})
    settings = settings_for(tmp_path, pytest_image, LAYERKEEP_TEST_FILES="tests/*.py",
                            LAYERKEEP_TEST_NODES="2",
                            # The files go after it, into a shell comment.
                            LAYERKEEP_TEST_COMMAND=f"{COMMAND} tests #")
    lines: list[str] = []
    result = run_tests(engine.for_job(Job.from_settings(settings)), settings, log=lines.append)
    assert result.counts.passed == 4, "\n".join(lines)  # each node ran both files
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert warnings == [
        f"warning: node {k}/2 ran tests of 1 file(s) outside its share (tests/test_{other}.py): "
        "LAYERKEEP_TEST_COMMAND may name the tests itself; put {files} where it does, so "
        "that each node runs its share"
        for k, other in ((1, "b"), (2, "a"))
    ]


# --- the bundled example -------------------------------------------------------------------


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory, engine: Engine) -> Iterator[Path]:
    """A copy of the bundled example with its layerkeep.env; its image is removed after."""
    root = committed_example(tmp_path_factory.mktemp("nodes-example") / "project")
    repository = f"{TEST_REPOSITORY}/{uuid.uuid4().hex[:10]}"
    (root / "image").write_text(f"{repository}/shortener")
    yield root
    remove_test_images(engine, repository)


def example_environ(
    example: Path, build_id: str, reports: str, **extra: str
) -> dict[str, str]:
    """The example's environment for one run: its image, the shared cache folder, the
    reports in ``reports`` and its test files split between nodes."""
    return clean_environ(
        LAYERKEEP_IMAGE=(example / "image").read_text(),
        LAYERKEEP_BUILD_ID=build_id,
        LAYERKEEP_CACHE_IMAGES="",
        LAYERKEEP_CACHE_DIR=str(example / "cache"),
        LAYERKEEP_REPORTS_DIR=str(example / reports),
        LAYERKEEP_TEST_FILES="example/tests/test_*.py",
        **extra,
    )


@dataclass(frozen=True)
class Seen:
    """What one node's container printed about its environment."""

    database: str
    redis: str


def test_two_nodes_on_the_example_use_separate_databases(example: Path, engine: Engine) -> None:
    build_id = f"n{uuid.uuid4().hex[:8]}"
    environ = example_environ(
        example, build_id, "reports",
        LAYERKEEP_TEST_COMMAND="python -m pytest {files} --junitxml=/reports/junit.xml",
        LAYERKEEP_TEST_SETUP='echo "seen: ${DATABASE_URL##*/} ${REDIS_URL##*/}"',
    )
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "test.run", "--nodes", "2"], cwd=example,
        env=environ, capture_output=True, text=True, check=False, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr
    seen = {
        line.split(" | ")[0]: Seen(*line.split("seen: ")[1].split())
        for line in done.stdout.splitlines()
        if " | seen: " in line
    }
    assert seen == {"node 1/2": Seen("shortener", "0"), "node 2/2": Seen("shortener_node2", "1")}
    report = json.loads((example / "reports" / "layerkeep-report.json").read_text())
    rows = {task["name"]: task for task in report["tasks"]}
    assert rows["db.init"]["note"] in ("created shortener_node2; shortener exists",
                                       "created shortener, shortener_node2")
    nodes = rows["test.run"]["figures"]["nodes"]
    assert [(node["node"], node["of"], node["files"]) for node in nodes] == [(1, 2, 1), (2, 2, 1)]
    assert all(node["tests"] > 0 and node["exit_code"] == 0 for node in nodes)
    assert rows["test.run"]["note"].startswith("node 1/2: ")
    reports = sorted(Path(node["reports"][0]).name for node in nodes)
    assert reports == ["junit-node1.xml", "junit-node2.xml"]
    cases = cases_in(tuple(example / "reports" / name for name in reports))
    assert len(cases) == len(set(cases))
    assert {case.split("::")[0] for case in cases} == {"tests.test_links", "tests.test_ops"}
    selector = [f"{BUILD_ID_LABEL}={build_id}"]
    assert engine.list_containers(selector) == []
    assert engine.list_networks(selector) == []


def test_sigterm_while_nodes_run_removes_every_container(example: Path, engine: Engine) -> None:
    build_id = f"n{uuid.uuid4().hex[:8]}"
    environ = example_environ(
        example, build_id, "reports-sigterm", LAYERKEEP_TEST_COMMAND="sleep 300; : {files}"
    )
    job = subprocess.Popen(
        [sys.executable, "-m", "invoke", "test.run", "--nodes", "2"], cwd=example,
        env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert job.stdout is not None
    seen: list[str] = []
    for line in job.stdout:
        seen.append(line)
        if len([each for each in seen if " | setup done in " in each]) == 2:
            break
    running = engine.list_containers([f"{BUILD_ID_LABEL}={build_id}",
                                      "io.layerkeep.purpose"])
    assert sorted(c["Labels"]["io.layerkeep.purpose"] for c in running) == [
        "tests-node1", "tests-node2"], "".join(seen)[-3000:]
    job.send_signal(signal.SIGTERM)
    _, errors = job.communicate(timeout=120)
    assert job.returncode == 143, errors
    assert errors == "layerkeep: test.run: interrupted by SIGTERM\n"
    selector = [f"{BUILD_ID_LABEL}={build_id}"]
    assert engine.list_containers(selector) == []
    assert engine.list_networks(selector) == []
