"""The task graph: Invoke's pre/post as the only list of steps, and what the run adds.

The real-task graph is checked on Invoke's own objects. The run's behaviour (summary,
cleanup, warnings, signals, dry runs) is checked with small tasks made by ``step`` in a
project of their own, run by a real ``inv`` process; the same runs on the real engine
are in test_ci_example.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from invoke.tasks import Task, task

from layerkeep.core.errors import LayerkeepError
from layerkeep.core.joblock import BuildIdInUse, hold_build_id
from layerkeep.core.outcome import SCHEMA_PATH
from layerkeep.tasks import ci_tasks, collection, image_tasks, testing_tasks
from layerkeep.tasks.graph import expansion, title_of

INV = [sys.executable, "-m", "invoke"]
CI_ORDER = [
    "git.touch", "cache.load", "image.build", "cache.save", "services.up", "db.init",
    "test.run", "services.down", "release.push", "ci",
]


def titles(tasks: list[Task[Any]]) -> list[str]:
    return [title_of(each) for each in tasks]


def test_ci_expands_to_every_task_in_order() -> None:
    assert titles(expansion(ci_tasks.ci)) == CI_ORDER


def test_test_run_and_image_build_carry_their_prerequisites() -> None:
    assert titles(expansion(testing_tasks.run)) == [
        "git.touch", "cache.load", "image.build", "services.up", "db.init", "test.run",
        "services.down",
    ]
    assert titles(expansion(image_tasks.build)) == ["git.touch", "cache.load", "image.build"]


@task
def lint(c: object) -> None:
    """A project's own check."""


@task
def smoke(c: object) -> None:
    """A project's own smoke test of the image."""


def test_project_steps_go_after_test_run_unless_placed() -> None:
    made = collection(steps=[lint, (smoke, "image.build")])
    order = titles(expansion(made["ci"]))
    assert order.index("smoke") == order.index("image.build") + 1
    assert order.index("services.down") < order.index("lint") < order.index("release.push")
    # The shared default collection is left as it was.
    assert titles(expansion(ci_tasks.ci)) == CI_ORDER


def test_placing_a_step_after_an_unknown_task_names_the_known_ones() -> None:
    with pytest.raises(LayerkeepError, match="no such task") as raised:
        collection(steps=[(lint, "image.biuld")])
    assert "image.build" in raised.value.hint


def test_build_id_lock_stops_a_configured_twin_and_moves_a_local_one(tmp_path: Path) -> None:
    first = hold_build_id("e", "p", "42", configured=True, command="inv ci", folder=tmp_path)
    with pytest.raises(BuildIdInUse, match=rf"pid {os.getpid()} \(inv ci"):
        hold_build_id("e", "p", "42", configured=True, command="inv x", folder=tmp_path)
    other_engine = hold_build_id("f", "p", "42", configured=True, command="", folder=tmp_path)
    assert other_engine.build_id == "42"
    local = hold_build_id("e", "p", "local", configured=False, command="", folder=tmp_path)
    twin = hold_build_id("e", "p", "local", configured=False, command="", folder=tmp_path)
    assert (local.build_id, twin.build_id) == ("local", "local-2")
    first.release()
    again = hold_build_id("e", "p", "42", configured=True, command="", folder=tmp_path)
    assert again.build_id == "42"
    for lock in (other_engine, local, twin, again):
        lock.release()


PROJECT = '''\
import os
import time
from pathlib import Path
from typing import Any

from invoke import task
from invoke.collection import Collection

from layerkeep.core.errors import LayerkeepError
from layerkeep.tasks.graph import Run, Skipped, is_dry, settings, step

LOG = Path(os.environ["GRAPH_LOG"])


def mark(c, text):
    if is_dry(c):
        print(f"would {text}")
        return
    with LOG.open("a") as log:
        log.write(text + "\\n")


@step("down", role="cleanup")
def down(c):
    mark(c, "down")
    if os.environ.get("DOWN_FAILS"):
        raise LayerkeepError("down broke too")
    return "removed"


@step("up")
def up(c):
    settings(c)  # as every real task does: the run's settings, its build id locked
    Run.of(c).register_cleanup(down)
    mark(c, "up")
    return "started"


@step("restore", role="cache")
def restore(c):
    mark(c, "restore")
    if os.environ.get("CACHE_FAILS"):
        raise OSError(28, "No space left on device")
    return "restored"


@step("work", pre=[restore, up])
def work(c):
    mark(c, "work")
    what = os.environ.get("WORK_DOES", "")
    if what == "fail":
        raise LayerkeepError("work broke", hint="fix it")
    if what == "run-false":
        c.run("false", hide=True)
    if what == "engine-error":
        import docker.errors
        raise docker.errors.NotFound("No such container: nope")
    if what == "sleep":
        mark(c, "sleeping")
        time.sleep(60)
    if what == "skip":
        return Skipped("nothing to do")
    return "done"


@step("after", pre=[work], post=[down])
def after(c):
    mark(c, "after")


ns = Collection(down, up, restore, work, after)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tasks.py").write_text(PROJECT)
    return tmp_path


def inv(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, "GRAPH_LOG": str(project / "log"), **env}
    return subprocess.run(
        [*INV, *args], cwd=project, env=environ, capture_output=True, text=True, check=False
    )


def marks(project: Path) -> list[str]:
    log = project / "log"
    return log.read_text().split() if log.exists() else []


def rows(output: str) -> dict[str, list[str]]:
    """Summary rows: task name (cleanup marked) -> the rest of the row's words."""
    table = output.split("\ntask ", 1)[1].splitlines()[1:-1]
    found: dict[str, list[str]] = {}
    for line in table:
        words = line.split()
        if words[1] == "(cleanup)":
            found[f"{words[0]} (cleanup)"] = words[2:]
        else:
            found[words[0]] = words[1:]
    return found


def test_a_run_prints_every_planned_task_and_runs_post_tasks(project: Path) -> None:
    done = inv(project, "after")
    assert done.returncode == 0, done.stderr
    assert marks(project) == ["restore", "up", "work", "after", "down"]
    table = rows(done.stdout)
    assert list(table) == ["restore", "up", "work", "after", "down"]
    assert table["work"][0] == "ok"
    assert table["work"][-1] == "done"


def test_a_failure_runs_cleanup_prints_the_summary_and_one_line(project: Path) -> None:
    done = inv(project, "after", WORK_DOES="fail")
    assert done.returncode == 1
    assert marks(project) == ["restore", "up", "work", "down"]
    table = rows(done.stdout)
    assert table["work"][0] == "failed"
    assert table["after"][0:2] == ["not", "run"]
    assert table["down (cleanup)"][0] == "ok"
    assert done.stderr.strip() == "layerkeep: work: work broke (fix it)"


@pytest.mark.parametrize(
    ("what", "line"),
    [
        ("run-false", "layerkeep: work: command 'false' exited 1"),
        ("engine-error", "layerkeep: work: the Docker engine failed: No such container: nope"),
    ],
)
def test_a_command_or_engine_error_is_one_line_and_still_cleans_up(
    project: Path, what: str, line: str
) -> None:
    done = inv(project, "work", WORK_DOES=what)
    assert done.returncode == 1
    assert done.stderr.strip() == line
    assert "Traceback" not in done.stderr + done.stdout
    assert marks(project)[-1] == "down"
    assert rows(done.stdout)["down (cleanup)"][0] == "ok"


def test_a_failing_cleanup_is_reported_beside_the_first_error(project: Path) -> None:
    done = inv(project, "after", WORK_DOES="fail", DOWN_FAILS="1")
    assert done.returncode == 1
    assert done.stderr.strip() == "layerkeep: work: work broke (fix it)"
    assert "warning: cleanup down failed: down broke too" in done.stdout
    assert rows(done.stdout)["down (cleanup)"][0] == "failed"


def test_a_cache_step_serving_another_task_only_warns(project: Path) -> None:
    served = inv(project, "work", CACHE_FAILS="1")
    assert served.returncode == 0, served.stderr
    assert "warning: restore: OSError: [Errno 28] No space left on device" in served.stdout
    assert rows(served.stdout)["restore"][0] == "warn"
    assert marks(project) == ["restore", "up", "work"]

    alone = inv(project, "restore", CACHE_FAILS="1")
    assert alone.returncode == 1
    assert alone.stderr.strip().startswith("layerkeep: restore: OSError")


def test_sigterm_interrupts_the_task_and_cleanup_still_runs(project: Path) -> None:
    environ = {**os.environ, "GRAPH_LOG": str(project / "log"), "WORK_DOES": "sleep"}
    running = subprocess.Popen(
        [*INV, "after"], cwd=project, env=environ, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while "sleeping" not in marks(project) and time.monotonic() < deadline:
        time.sleep(0.1)
    running.send_signal(signal.SIGTERM)
    stdout, stderr = running.communicate(timeout=30)
    assert running.returncode == 143
    assert marks(project) == ["restore", "up", "work", "sleeping", "down"]
    assert stderr.strip() == "layerkeep: work: interrupted by SIGTERM"
    assert rows(stdout)["down (cleanup)"][0] == "ok"


def test_dry_run_prints_the_plan_and_runs_no_body(project: Path) -> None:
    done = inv(project, "--dry", "after")
    assert done.returncode == 0, done.stderr
    assert "dry run, nothing is changed; plan: restore -> up -> work -> after -> down" in (
        done.stdout
    )
    assert marks(project) == []
    assert "would work" in done.stdout


def test_no_cleanup_when_another_run_holds_the_build_id(project: Path) -> None:
    environ = {**os.environ, "GRAPH_LOG": str(project / "log"), "WORK_DOES": "sleep"}
    environ["LAYERKEEP_BUILD_ID"] = "shared-7"
    first = subprocess.Popen(
        [*INV, "work"], cwd=project, env=environ, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    while "sleeping" not in marks(project) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = inv(project, "work", LAYERKEEP_BUILD_ID="shared-7")
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=30)

    assert second.returncode == 4
    assert f"build id 'shared-7' is in use on this engine by pid {first.pid}" in second.stderr
    assert marks(project).count("down") == 1  # the first run's own cleanup only


def test_old_add_step_points_at_the_new_call(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text(
        "from layerkeep.tasks import ci_tasks, ns\n"
        "def lint(c): pass\n"
        "ci_tasks.add_step(lint, after='image.build')\n"
    )
    done = inv(tmp_path, "--list")
    assert done.returncode != 0
    assert "ci_tasks.add_step() was replaced" in done.stderr
    assert "collection(steps=" in done.stderr
    assert "Traceback" not in done.stderr


def test_skip_dependencies_runs_only_the_named_task(project: Path) -> None:
    done = inv(project, "after", LAYERKEEP_SKIP_DEPENDENCIES="yes")
    assert done.returncode == 0, done.stderr
    assert marks(project) == ["after"]
    table = rows(done.stdout)
    assert table["work"] == ["skipped", "0.0", "s", "LAYERKEEP_SKIP_DEPENDENCIES"]
    assert table["down"][0] == "skipped"


def test_every_run_writes_a_report_that_follows_the_schema(project: Path) -> None:
    summary = project / "step-summary.md"
    summary.write_text("earlier content\n")
    done = inv(project, "after", WORK_DOES="fail", GITHUB_STEP_SUMMARY=str(summary))
    assert done.returncode == 1

    document = json.loads((project / "reports" / "layerkeep-report.json").read_text())
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(document, schema)
    assert document["passed"] is False
    assert document["error"] == "work: work broke (fix it)"
    assert document["job"]["build_id"] == "local"
    tasks = {task["name"]: task for task in document["tasks"]}
    assert tasks["work"]["result"] == "failed"
    assert tasks["down"]["cleanup"] is True
    assert tasks["after"]["result"] == "not run"
    markdown = summary.read_text()
    assert markdown.startswith("earlier content\n### layerkeep: after")
    assert "| work | ❌ failed |" in markdown


def test_a_dry_run_writes_no_report(project: Path) -> None:
    done = inv(project, "--dry", "after")
    assert done.returncode == 0, done.stderr
    assert not (project / "reports").exists()
