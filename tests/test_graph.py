"""The task graph: Invoke's pre/post as the only list of steps, and what the run adds.

The real-task graph is checked on Invoke's own objects. The run's behaviour (each task
once per command, summary, cleanup, warnings, signals, dry runs, flags, the executor's
installation) is checked with small tasks made by ``step`` in a project of their own,
shaped like the real graph and run by a real ``inv`` process; the same command lines on
the real engine are in test_graph_example.py and test_ci_example.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from clean_env import clean_environ
from invoke.tasks import Task, task

from layerkeep.core.errors import LayerkeepError
from layerkeep.core.joblock import LOCK_FOLDER, BuildIdInUse, hold_build_id
from layerkeep.core.outcome import SCHEMA_PATH
from layerkeep.tasks import ci_tasks, collection, image_tasks, testrun_tasks
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
    assert titles(expansion(testrun_tasks.run)) == [
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

from invoke import task
from invoke.collection import Collection

from layerkeep.core.errors import LayerkeepError
from layerkeep.tasks.graph import Skipped, is_dry, register_cleanup, settings, step

LOG = Path(os.environ["GRAPH_LOG"])


def mark(c, text):
    if is_dry(c):
        print(f"would {text}")
        return
    with LOG.open("a") as log:
        log.write(text + "\\n")


def behave(c, name):
    """What the environment asks task ``name`` to do: fail, run false, sleep, skip."""
    what = os.environ.get(f"{name.upper()}_DOES", "")
    if what == "fail":
        raise LayerkeepError(f"{name} broke", hint="fix it")
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


@step("down", role="cleanup")
def down(c):
    mark(c, "down")
    if os.environ.get("DOWN_FAILS"):
        raise LayerkeepError("down broke too")
    if settings(c).keep_services:
        return Skipped("kept on purpose")
    return "removed"


@step("up")
def up(c):
    settings(c)
    register_cleanup(c, down)
    mark(c, "up")
    return "started"


# Shaped like cache.load, image.build, cache.save and test.run, with the same flags.
@step("restore", role="cache", flags=["--cache-dir", "--backend"])
def restore(c):
    current = settings(c)
    print(f"restore sees image {current.image} and backend {current.cache_backend}")
    mark(c, "restore")
    if os.environ.get("CACHE_FAILS"):
        raise OSError(28, "No space left on device")
    return "restored"


@step("build", pre=[restore], flags=["--builder", "--image"])
def build(c):
    mark(c, "build")
    return behave(c, "build")


@step("save", pre=[build], role="cache", flags=["--cache-dir", "--backend"])
def save(c):
    mark(c, "save")
    return "saved"


@step("check", pre=[build, up], post=[down], flags=["--keep-services"])
def check(c):
    mark(c, "check")
    return behave(c, "check")


@step("work", pre=[restore, up])
def work(c):
    mark(c, "work")
    return behave(c, "work")


@step("after", pre=[work], post=[down])
def after(c):
    mark(c, "after")


@task
def hello(c):
    """A plain Invoke task of the project's own."""
    mark(c, "hello")


@task(pre=[build])
def lint(c):
    """A plain Invoke task of the project's own that needs a layerkeep step."""
    mark(c, "lint")
    return behave(c, "lint")


ns = Collection(down, up, restore, build, save, check, work, after, hello, lint)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "tasks.py").write_text(PROJECT)
    return tmp_path


def environ(project: Path, **env: str) -> dict[str, str]:
    return clean_environ(GRAPH_LOG=str(project / "log"), **env)


def inv(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*INV, *args], cwd=project, env=environ(project, **env), capture_output=True,
        text=True, check=False, timeout=120,
    )


def start(project: Path, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*INV, *args], cwd=project, env=environ(project, **env), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )


def wait_for_mark(project: Path, mark: str) -> None:
    deadline = time.monotonic() + 30
    while mark not in marks(project) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mark in marks(project), marks(project)


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


def summaries(output: str) -> int:
    """How many summary tables the output has."""
    return output.count("\ntask ")


def report(project: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(
        (project / "reports" / "layerkeep-report.json").read_text()
    )
    return document


# --- one command, each task once ----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "ran"),
    [
        # image.build test.run: the named image.build carries its flags, test.run's
        # pre reaches it without: one task all the same.
        (["build", "check"], ["restore", "build", "up", "check", "down"]),
        (["restore", "build", "save"], ["restore", "build", "save"]),
        (["up", "check"], ["up", "restore", "build", "check", "down"]),
        (["build", "--image", "other/app", "check", "--keep-services"],
         ["restore", "build", "up", "check", "down"]),
    ],
)
def test_each_task_of_a_command_runs_once_with_one_summary_and_one_lock(
    project: Path, command: list[str], ran: list[str]
) -> None:
    # Another run holds the local build id: this run moves to local-2, and says so once.
    holder = hold_build_id(
        "unix:///var/run/docker.sock", project.name, "local", configured=False,
        command="the test", folder=LOCK_FOLDER,
    )
    try:
        done = inv(project, *command)
    finally:
        holder.release()
    assert done.returncode == 0, done.stdout + done.stderr
    assert marks(project) == ran
    for name in ran:
        assert done.stdout.count(f"==> {name}\n") == 1, done.stdout
    assert summaries(done.stdout) == 1, done.stdout
    assert list(rows(done.stdout)) == ran
    assert done.stdout.count("this run uses 'local-2'") == 1, done.stdout
    assert report(project)["job"]["build_id"] == "local-2"
    assert [task["name"] for task in report(project)["tasks"]] == ran


def test_a_dry_command_plans_once(project: Path) -> None:
    done = inv(project, "--dry", "build", "check")
    assert done.returncode == 0, done.stderr
    plan = "dry run, nothing is changed; plan: restore -> build -> up -> check -> down"
    assert done.stdout.count("dry run, nothing is changed") == 1
    assert plan in done.stdout
    for name in ("restore", "build", "up", "check", "down"):
        assert done.stdout.count(f"would {name}\n") == 1, done.stdout
    assert summaries(done.stdout) == 1
    assert marks(project) == []


def test_a_flag_reaches_the_prerequisites_of_the_same_command(project: Path) -> None:
    done = inv(project, "build", "--image", "other/app")
    assert done.returncode == 0, done.stderr
    assert "restore sees image other/app:latest and backend dir" in done.stdout
    # Named before the task whose flag it is, too; and another task's flag beside it.
    both = inv(project, "restore", "build", "--image", "other/app", "save", "--backend", "registry")
    assert both.returncode == 0, both.stderr
    assert "restore sees image other/app:latest and backend registry" in both.stdout


def test_a_flag_holds_for_the_post_tasks_too(project: Path) -> None:
    done = inv(project, "check", "--keep-services")
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout)["down"] == ["skipped", "0.0", "s", "kept", "on", "purpose"]


def test_a_flag_given_two_values_is_one_line(project: Path) -> None:
    done = inv(project, "restore", "--backend", "dir", "save", "--backend", "registry")
    assert done.returncode == 2
    assert done.stderr == (
        "layerkeep: --backend is given twice: 'dir' (restore) and 'registry' (save) "
        "(give it once: it holds for every task of the command)\n"
    )
    assert marks(project) == []


def test_a_bad_flag_value_names_its_task_and_starts_nothing(project: Path) -> None:
    done = inv(project, "build", "--builder", "podman", "check")
    assert done.returncode == 2
    assert done.stderr.startswith(
        "layerkeep: build: LAYERKEEP_BUILDER='podman' (from flag --builder) is not valid"
    )
    assert marks(project) == []


# --- failures, cleanup, signals ------------------------------------------------------


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


def test_a_failure_in_a_command_of_several_tasks_cleans_up_once(project: Path) -> None:
    done = inv(project, "up", "check", CHECK_DOES="fail")
    assert done.returncode == 1
    assert marks(project) == ["up", "restore", "build", "check", "down"]
    assert done.stdout.count("==> down (cleanup)\n") == 1
    assert summaries(done.stdout) == 1
    assert done.stderr == "layerkeep: check: check broke (fix it)\n"


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


@pytest.mark.parametrize("command", [["after"], ["build", "check"]])
def test_sigterm_interrupts_the_task_and_cleanup_still_runs_once(
    project: Path, command: list[str]
) -> None:
    sleeper = "work" if command == ["after"] else "check"
    running = start(project, *command, **{f"{sleeper.upper()}_DOES": "sleep"})
    wait_for_mark(project, "sleeping")
    running.send_signal(signal.SIGTERM)
    stdout, stderr = running.communicate(timeout=30)
    assert running.returncode == 143
    assert marks(project)[-2:] == ["sleeping", "down"]
    assert marks(project).count("down") == 1
    assert stderr == f"layerkeep: {sleeper}: interrupted by SIGTERM\n"
    assert rows(stdout)["down (cleanup)"][0] == "ok"
    assert summaries(stdout) == 1


def test_dry_run_prints_the_plan_and_runs_no_body(project: Path) -> None:
    done = inv(project, "--dry", "after")
    assert done.returncode == 0, done.stderr
    assert "dry run, nothing is changed; plan: restore -> up -> work -> after -> down" in (
        done.stdout
    )
    assert marks(project) == []
    assert "would work" in done.stdout


def test_no_cleanup_when_another_run_holds_the_build_id(project: Path) -> None:
    first = start(project, "work", WORK_DOES="sleep", LAYERKEEP_BUILD_ID="shared-7")
    wait_for_mark(project, "sleeping")
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

    document = report(project)
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


# --- the project's plain tasks --------------------------------------------------------


def test_a_plain_task_beside_steps_gets_a_row_and_its_failure_cleans_up(project: Path) -> None:
    done = inv(project, "up", "lint")
    assert done.returncode == 0, done.stderr
    assert marks(project) == ["up", "restore", "build", "lint"]
    assert rows(done.stdout)["lint"][-1] == "done"

    failed = inv(project, "up", "lint", LINT_DOES="run-false")
    assert failed.returncode == 1
    assert failed.stderr == "layerkeep: lint: command 'false' exited 1\n"
    assert marks(project)[-2:] == ["lint", "down"]
    assert rows(failed.stdout)["down (cleanup)"][0] == "ok"


def test_a_command_of_plain_tasks_only_is_plain_invoke(project: Path) -> None:
    done = inv(project, "hello")
    assert done.returncode == 0, done.stderr
    assert marks(project) == ["hello"]
    assert done.stdout == ""
    assert not (project / "reports").exists()


# --- the preflight covers the whole command (real tasks, no engine needed) -----------


def test_preflight_checks_every_task_of_the_command_before_anything_starts(
    tmp_path: Path,
) -> None:
    (tmp_path / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    (tmp_path / "layerkeep.env").write_text(
        "LAYERKEEP_IMAGE=layerkeep-test/never-built\nLAYERKEEP_TEST_MOUNTS=tset:/app/tests\n"
    )
    # test.run's mount is wrong; image.build, named first, would start the engine work.
    done = inv(
        tmp_path, "image.build", "test.run", DOCKER_HOST="unix:///tmp/no-such-docker.sock"
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("layerkeep: nothing was started: LAYERKEEP_TEST_MOUNTS: ")
    assert done.stdout.count("preflight: ") == 1
    assert "==>" not in done.stdout


# --- the executor: installed for the plain `inv`, honoured, or one line --------------


def script(name: str) -> list[str]:
    """The `inv` or `invoke` script of this interpreter's environment."""
    found = Path(sys.executable).with_name(name)
    where = str(found) if found.exists() else shutil.which(name)
    if where is None:
        pytest.skip(f"no {name} script next to {sys.executable} or on PATH")
    return [where]


@pytest.mark.parametrize("binary", ["inv", "invoke", "python -m invoke"])
def test_the_plain_binaries_run_each_task_once(project: Path, binary: str) -> None:
    command = INV if binary == "python -m invoke" else script(binary)
    done = subprocess.run(
        [*command, "build", "check"], cwd=project, env=environ(project),
        capture_output=True, text=True, check=False, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert marks(project) == ["restore", "build", "up", "check", "down"]
    assert summaries(done.stdout) == 1


SUBCLASS = """
from invoke.collection import Collection
from layerkeep.tasks.executor import LayerkeepExecutor


class Loud(LayerkeepExecutor):
    def execute(self, *tasks):
        print("the project's own executor")
        return super().execute(*tasks)
"""


def test_a_configured_subclass_of_the_executor_is_honoured(project: Path) -> None:
    (project / "tasks.py").write_text(PROJECT + SUBCLASS)
    (project / "invoke.yaml").write_text("tasks:\n  executor_class: tasks.Loud\n")
    done = inv(project, "build", "check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("the project's own executor\n")
    assert marks(project) == ["restore", "build", "up", "check", "down"]


OWN_PROGRAM = """\
from invoke import Program

from tasks import ns

Program(namespace=ns, version="1").run()
"""


@pytest.mark.parametrize("how", ["invoke.yaml", "own program"])
def test_another_executor_stops_with_one_line_saying_what_to_set(
    project: Path, how: str
) -> None:
    if how == "invoke.yaml":
        (project / "invoke.yaml").write_text(
            "tasks:\n  executor_class: invoke.executor.Executor\n"
        )
        command = [*INV, "build", "check"]
    else:
        (project / "prog.py").write_text(OWN_PROGRAM)
        command = [sys.executable, "prog.py", "build", "check"]
    done = subprocess.run(
        command, cwd=project, env=environ(project), capture_output=True, text=True,
        check=False, timeout=120,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (
        "layerkeep: restore: layerkeep's tasks run under its executor, and this Invoke "
        "program uses another: set tasks.executor_class to "
        "layerkeep.tasks.executor.LayerkeepExecutor (or a subclass of it) in your Invoke "
        "config, or pass executor_class= to your Program\n"
    )
    assert marks(project) == []
