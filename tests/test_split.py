"""The node split without an engine: which node, which files, the shares, the timings.

Shares must be the same on every node (each computes them alone), cover every file once,
and balance by the seconds earlier JUnit reports gave each file.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest
from registry_setup import running_registry

from layerkeep.core.ci_vars import GitFacts, commit_time, detect
from layerkeep.core.errors import ConfigError
from layerkeep.core.settings import Settings, load_settings
from layerkeep.testrun import split
from layerkeep.testrun.reports_folder import move_reports
from layerkeep.testrun.split import (
    Node,
    container_path,
    current_node,
    file_weights,
    find_test_files,
    plan_tests,
    share_command,
    split_files,
)
from layerkeep.testrun.timing_store import TIMINGS_FILE, load_history, save_history
from layerkeep.testrun.timings import (
    FileTime,
    History,
    file_seconds,
    history_digest,
    history_text,
    latest,
    merge,
    parse_history,
)


def settings_in(root: Path, **environ: str) -> Settings:
    return load_settings(
        root, {"LAYERKEEP_IMAGE": "app", **environ}, git_facts=lambda _: GitFacts("", "")
    )


def one_each(times: Mapping[str, FileTime]) -> dict[str, tuple[FileTime, ...]]:
    """A history holding one measurement per file."""
    return {name: (entry,) for name, entry in times.items()}


def uneven_suite(root: Path, seconds: Mapping[str, float]) -> None:
    """Test files whose sizes say nothing of their time: the slow ones are the small ones."""
    for number, (name, value) in enumerate(seconds.items()):
        path = root / "tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        padding = "#" * int(2000 / (value + 0.1)) + "\n"
        path.write_text(f"import time\n{padding}def test_{number}():\n    time.sleep({value})\n")


# --- which node ----------------------------------------------------------------------


def test_ci_node_variables_count_from_one() -> None:
    circle = {"CIRCLECI": "true", "CIRCLE_NODE_INDEX": "0", "CIRCLE_NODE_TOTAL": "4"}
    assert (detect(circle).node_index, detect(circle).node_total) == (1, 4)
    last = detect({**circle, "CIRCLE_NODE_INDEX": "3"})
    assert (last.node_index, last.node_total) == (4, 4)
    gitlab = detect({"GITLAB_CI": "true", "CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "3"})
    assert (gitlab.node_index, gitlab.node_total) == (2, 3)
    for odd in ({"CI_NODE_INDEX": "0", "CI_NODE_TOTAL": "3"},
                {"CI_NODE_INDEX": "4", "CI_NODE_TOTAL": "3"},
                {"CI_NODE_INDEX": "²", "CI_NODE_TOTAL": "3"},
                {"CI_NODE_TOTAL": "3"}):
        facts = detect({"GITLAB_CI": "true", **odd})
        assert (facts.node_index, facts.node_total) == (0, 0), odd
    # GitHub names no node: a matrix sets LAYERKEEP_NODE_INDEX/_TOTAL itself.
    assert detect({"GITHUB_ACTIONS": "true", "GITHUB_SHA": "a"}).node_total == 0


def test_the_node_comes_from_the_ci_unless_set(tmp_path: Path) -> None:
    circle = {"CIRCLECI": "true", "CIRCLE_NODE_INDEX": "2", "CIRCLE_NODE_TOTAL": "4"}
    assert current_node(settings_in(tmp_path, **circle)) == Node(3, 4)
    assert settings_in(tmp_path, **circle).origins["LAYERKEEP_NODE_INDEX"] == (
        "default (CI variables)"
    )
    assert current_node(settings_in(tmp_path)) == Node(1, 1)
    own = settings_in(tmp_path, LAYERKEEP_NODE_INDEX="1", LAYERKEEP_NODE_TOTAL="1", **circle)
    assert current_node(own) == Node(1, 1)
    matrix = settings_in(tmp_path, LAYERKEEP_NODE_INDEX="2", LAYERKEEP_NODE_TOTAL="2")
    assert str(current_node(matrix)) == "node 2/2"


def test_a_node_past_the_total_is_one_line(tmp_path: Path) -> None:
    wrong = settings_in(tmp_path, LAYERKEEP_NODE_INDEX="5", LAYERKEEP_NODE_TOTAL="4")
    with pytest.raises(ConfigError) as raised:
        current_node(wrong)
    assert raised.value.one_line() == (
        "LAYERKEEP_NODE_INDEX=5 (from environment) is more than LAYERKEEP_NODE_TOTAL=4 "
        "(nodes are numbered from 1 to LAYERKEEP_NODE_TOTAL)"
    )
    with pytest.raises(ConfigError, match="LAYERKEEP_NODE_INDEX"):
        settings_in(tmp_path, LAYERKEEP_NODE_INDEX="0")


# --- the split -------------------------------------------------------------------------


def test_every_file_is_in_exactly_one_share() -> None:
    chooser = random.Random(7)  # noqa: S311  # not a secret: varied weights
    for count_files, nodes in itertools.product((1, 2, 5, 13, 40), (1, 2, 3, 4, 7)):
        weights = {f"tests/test_{n}.py": chooser.choice([0.0, 0.5, 1.0, chooser.random()])
                   for n in range(count_files)}
        shares = split_files(weights, nodes)
        assert len(shares) == nodes
        together = [name for share in shares for name in share]
        assert sorted(together) == sorted(weights), (count_files, nodes)
        assert all(list(share) == sorted(share) for share in shares)


def test_shares_do_not_depend_on_the_order_the_files_come_in() -> None:
    weights = {f"t/{n}.py": float(n % 4) for n in range(30)}
    reordered = dict(reversed(list(weights.items())))
    assert split_files(weights, 4) == split_files(reordered, 4)


def test_files_of_no_weight_are_spread_not_piled_on_one_node() -> None:
    shares = split_files({f"t/{n}.py": 0.0 for n in range(8)}, 4)
    assert [len(share) for share in shares] == [2, 2, 2, 2]


def test_the_split_balances_uneven_files() -> None:
    seconds = [4.0, 3.1, 2.5, 2.0, 1.6, 1.2, 1.0, 0.9, 0.6, 0.5, 0.3, 0.3, 0.2, 0.1]
    weights = {f"t/{n:02}.py": value for n, value in enumerate(seconds)}
    for nodes in (2, 3, 4):
        loads = [sum(weights[name] for name in share) for share in split_files(weights, nodes)]
        assert max(loads) <= 1.2 * sum(seconds) / nodes, (nodes, loads)


def test_weights_come_from_timings_else_from_sizes() -> None:
    files = [split.TestFile("a.py", 100), split.TestFile("b.py", 300), split.TestFile("c.py", 500)]
    by_size, basis = file_weights(files, {})
    assert by_size == {"a.py": 100.0, "b.py": 300.0, "c.py": 500.0}
    assert basis == "file sizes (no test timings yet)"
    history = {"a.py": FileTime(1.0, 1.0), "b.py": FileTime(7.0, 1.0), "old.py": FileTime(9, 1)}
    weights, basis = file_weights(files, history)
    # c.py has no timing: its size at the others' 8 s per 400 bytes (not their mean, 4 s).
    assert weights == {"a.py": 1.0, "b.py": 7.0, "c.py": pytest.approx(10.0)}
    known = {name: history[name] for name in ("a.py", "b.py")}
    assert basis == f"timings of 2/3 files ({history_digest(known)})"


def test_the_command_gets_the_share(tmp_path: Path) -> None:
    files = ["tests/test a.py", "tests/b.py"]
    assert share_command("pytest {files} -x", files) == "pytest 'tests/test a.py' tests/b.py -x"
    assert share_command("pytest --junitxml=/reports/j.xml", files) == (
        "pytest --junitxml=/reports/j.xml 'tests/test a.py' tests/b.py"
    )


def test_files_are_named_as_the_container_sees_them(tmp_path: Path) -> None:
    (tmp_path / "example" / "tests").mkdir(parents=True)
    (tmp_path / "example" / "tests" / "test_a.py").write_text("")
    (tmp_path / "example" / "test_b.py").write_text("")
    (tmp_path / "top_test.py").write_text("")
    mounted = settings_in(
        tmp_path, LAYERKEEP_CONTEXT="example", LAYERKEEP_TEST_WORKDIR="/app",
        LAYERKEEP_TEST_MOUNTS="example/tests:/app/tests:ro",
    )
    assert container_path(mounted, tmp_path / "example/tests/test_a.py") == "tests/test_a.py"
    assert container_path(mounted, tmp_path / "example/test_b.py") == "test_b.py"
    assert container_path(mounted, tmp_path / "top_test.py") == "top_test.py"
    elsewhere = settings_in(
        tmp_path, LAYERKEEP_TEST_WORKDIR="/srv", LAYERKEEP_TEST_MOUNTS="example/tests:/app/t"
    )
    assert container_path(elsewhere, tmp_path / "example/tests/test_a.py") == "/app/t/test_a.py"
    with pytest.raises(ConfigError, match="outside the project"):
        container_path(mounted, tmp_path.parent / "x.py")


def test_the_globs_must_match(tmp_path: Path) -> None:
    uneven_suite(tmp_path, {"test_a.py": 1, "sub/test_b.py": 1})
    found = find_test_files(settings_in(tmp_path, LAYERKEEP_TEST_FILES="tests/**/test_*.py"))
    assert [file.path for file in found] == ["tests/sub/test_b.py", "tests/test_a.py"]
    with pytest.raises(ConfigError) as raised:
        find_test_files(settings_in(tmp_path, LAYERKEEP_TEST_FILES="spec/*.py"))
    assert raised.value.one_line() == (
        f"LAYERKEEP_TEST_FILES=spec/*.py matches no file in {tmp_path} (globs are relative "
        "to the project folder, e.g. tests/**/test_*.py)"
    )
    with pytest.raises(ConfigError, match="absolute path"):
        find_test_files(settings_in(tmp_path, LAYERKEEP_TEST_FILES="/tests/*.py"))


# --- plans -------------------------------------------------------------------------------


def test_every_ci_node_plans_the_same_shares(tmp_path: Path) -> None:
    uneven_suite(tmp_path, {f"test_{n}.py": n / 10 for n in range(11)})
    history = one_each({f"tests/test_{n}.py": FileTime(n / 10, 5.0) for n in range(0, 11, 2)})
    seen: list[str] = []
    for nodes in (1, 2, 3, 4):
        mine = []
        for index in range(1, nodes + 1):
            node_settings = settings_in(
                tmp_path, LAYERKEEP_TEST_FILES="tests/test_*.py",
                LAYERKEEP_NODE_INDEX=str(index), LAYERKEEP_NODE_TOTAL=str(nodes),
            )
            plan = plan_tests(node_settings, dict(reversed(history.items())), log=seen.append)
            assert plan.nodes == (Node(index, nodes),)
            assert plan.shares is not None
            mine.append(plan.shares[Node(index, nodes)])
        together = [name for share in mine for name in share]
        assert sorted(together) == [f"tests/test_{n}.py" for n in sorted(range(11), key=str)]
    assert seen == []


def test_local_nodes_plan_every_share(tmp_path: Path) -> None:
    uneven_suite(tmp_path, {f"test_{n}.py": 0.1 for n in range(3)})
    plan = plan_tests(
        settings_in(tmp_path, LAYERKEEP_TEST_FILES="tests/*.py", LAYERKEEP_TEST_NODES="4"),
        {}, log=print,
    )
    assert plan.nodes == tuple(Node(k, 4) for k in range(1, 5))
    assert plan.shares is not None
    assert [len(plan.shares[node]) for node in plan.nodes] == [1, 1, 1, 0]
    assert plan.describe(Node(4, 4)) == (
        "node 4/4: 0 of 3 files, by file sizes (no test timings yet)"
    )


def test_a_ci_node_that_cannot_read_the_timings_runs_every_file(tmp_path: Path) -> None:
    uneven_suite(tmp_path, {f"test_{n}.py": 0.1 for n in range(3)})
    lines: list[str] = []
    node = settings_in(tmp_path, LAYERKEEP_TEST_FILES="tests/*.py",
                       LAYERKEEP_NODE_INDEX="2", LAYERKEEP_NODE_TOTAL="3")
    plan = plan_tests(node, None, log=lines.append)
    assert plan.shares == {Node(2, 3): ("tests/test_0.py", "tests/test_1.py", "tests/test_2.py")}
    assert lines == ["warning: node 2/3 cannot tell which files the other nodes run without "
                     "the test timings: it runs every file, so that none is left out"]


def test_plans_that_cannot_work_stop_in_one_line(tmp_path: Path) -> None:
    uneven_suite(tmp_path, {"test_a.py": 0.1})
    cases = {
        "LAYERKEEP_TEST_NODES=2 needs LAYERKEEP_TEST_FILES, the files to split": {
            "LAYERKEEP_TEST_NODES": "2"},
        "LAYERKEEP_TEST_COMMAND has {files} but LAYERKEEP_TEST_FILES is empty": {
            "LAYERKEEP_TEST_COMMAND": "pytest {files}"},
        "LAYERKEEP_TEST_NODES=2 runs test nodes on this machine, and this job is already "
        "node 1/2 of a parallel CI job": {
            "LAYERKEEP_TEST_NODES": "2", "LAYERKEEP_NODE_TOTAL": "2",
            "LAYERKEEP_TEST_FILES": "tests/*.py"},
    }
    for message, environ in cases.items():
        with pytest.raises(ConfigError) as raised:
            plan_tests(settings_in(tmp_path, **environ), {}, log=print)
        assert raised.value.message == message


def test_an_unsplit_ci_node_says_it_runs_everything(tmp_path: Path) -> None:
    lines: list[str] = []
    plan = plan_tests(settings_in(tmp_path, LAYERKEEP_NODE_TOTAL="3"), {}, log=lines.append)
    assert plan.shares is None
    assert lines == ["warning: this job is node 1/3 of a parallel CI job, but "
                     "LAYERKEEP_TEST_FILES is not set: this node runs every test (set it to "
                     "split them between the nodes)"]


# --- timings from JUnit ---------------------------------------------------------------------


PYTEST_XML = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_links" name="test_a" time="1.5"/>
<testcase classname="tests.test_links.TestGroup" name="test_b" time="0.25"/>
<testcase classname="tests.sub.test_links" name="test_c" time="2"/>
<testcase classname="tests.test_ops" name="test_d[1-x.y]" time="0.5"><skipped/></testcase>
<testcase classname="elsewhere.test_other" name="test_e" time="9"/>
<testcase classname="tests.test_ops" name="test_f" time="bad"/>
</testsuite></testsuites>
"""
FILE_XML = """<testsuite>
<testcase file="/app/tests/test_ops.py" classname="x" name="a" time="1"/>
<testcase file="tests/sub/test_links.py" classname="x" name="b" time="3"/>
<testcase file="./tests/test_links.py" classname="tests.test_ops" name="c" time="1"/>
</testsuite>
"""


def test_junit_times_add_up_per_file(tmp_path: Path) -> None:
    (tmp_path / "pytest.xml").write_text(PYTEST_XML)
    (tmp_path / "file.xml").write_text(FILE_XML)
    (tmp_path / "broken.xml").write_text("<testsuite>")
    files = ["tests/test_links.py", "tests/sub/test_links.py", "tests/test_ops.py"]
    lines: list[str] = []
    seconds = file_seconds(
        [tmp_path / "pytest.xml", tmp_path / "broken.xml"], files, log=lines.append
    )
    assert seconds == {"tests/test_links.py": 1.75, "tests/sub/test_links.py": 2.0,
                       "tests/test_ops.py": 0.5}
    assert len(lines) == 1
    assert lines[0].startswith("warning: broken.xml not read")
    by_file = file_seconds([tmp_path / "file.xml"], files, log=print)
    assert by_file == {"tests/test_ops.py": 1.0, "tests/sub/test_links.py": 3.0,
                       "tests/test_links.py": 1.0}
    # Named from another root: the files' tails still match.
    absolute = file_seconds([tmp_path / "pytest.xml"], ["/app/tests/test_ops.py"], log=print)
    assert absolute == {"/app/tests/test_ops.py": 0.5}


def test_a_classname_two_files_end_in_is_not_guessed(tmp_path: Path) -> None:
    (tmp_path / "j.xml").write_text(
        '<testsuite><testcase classname="test_links" name="a" time="1"/></testsuite>'
    )
    files = ["a/test_links.py", "b/test_links.py"]
    assert file_seconds([tmp_path / "j.xml"], files, log=print) == {}


def test_histories_keep_the_newest_measurement_of_each_commit() -> None:
    older = {"a.py": (FileTime(1.0, 10.0, "c1"),), "b.py": (FileTime(2.0, 10.0, "c1"),)}
    newer = {"a.py": (FileTime(3.0, 20.0, "c2"),), "c.py": (FileTime(4.0, 20.0, "c2"),)}
    again = {"a.py": (FileTime(5.0, 30.0, "c2"),)}
    expected = {"a.py": (FileTime(5.0, 30.0, "c2"), FileTime(1.0, 10.0, "c1")),
                "b.py": (FileTime(2.0, 10.0, "c1"),), "c.py": (FileTime(4.0, 20.0, "c2"),)}
    assert merge(older, newer, again) == merge(again, newer, older) == expected
    many = merge(*({"a.py": (FileTime(1.0, float(n), f"c{n}"),)} for n in range(8)))
    assert [entry.commit for entry in many["a.py"]] == ["c7", "c6", "c5", "c4", "c3"]
    assert latest(expected) == {"a.py": FileTime(5.0, 30.0, "c2"),
                                "b.py": FileTime(2.0, 10.0, "c1"),
                                "c.py": FileTime(4.0, 20.0, "c2")}
    before_c2 = {"a.py": FileTime(1.0, 10.0, "c1"), "b.py": FileTime(2.0, 10.0, "c1")}
    assert latest(expected, commit="c2") == latest(expected, before=15.0) == before_c2
    lines: list[str] = []
    assert parse_history(history_text(expected), where="x", log=lines.append) == expected
    entry = {"seconds": -1, "at": 1, "commit": ""}
    for damaged in ("{", '{"format": "other/1", "files": {}}',
                    json.dumps({"format": "layerkeep-test-timings/1", "files": {"a.py": [entry]}}),
                    json.dumps({"format": "layerkeep-test-timings/1", "files": {"a.py": [{}]}})):
        assert parse_history(damaged, where="the file", log=lines.append) is None
    assert len(lines) == 4
    assert all(line.startswith("warning: ignored the damaged test timings in the file")
               for line in lines)


def test_ci_nodes_ignore_what_their_siblings_save_while_they_run(tmp_path: Path) -> None:
    """Node 1 of a run ends first and saves its files' seconds; node 2 starts later and
    must still split as node 1 did, else a file runs twice or not at all."""
    uneven_suite(tmp_path, {f"test_{n}.py": 0.1 for n in range(8)})
    before = one_each({f"tests/test_{n}.py": FileTime(n + 1.0, 100.0, "old") for n in range(8)})

    def plan(index: int, history: History, *, commit_time: float | None) -> tuple[str, ...]:
        node = settings_in(tmp_path, LAYERKEEP_TEST_FILES="tests/*.py", LAYERKEEP_COMMIT="new",
                           LAYERKEEP_NODE_INDEX=str(index), LAYERKEEP_NODE_TOTAL="2")
        shares = plan_tests(node, history, log=print, commit_time=commit_time).shares
        assert shares is not None
        return shares[Node(index, 2)]

    first = plan(1, before, commit_time=None)
    # Node 1 saved: for this commit, and (a clock says) after this commit was made.
    saved = {name: (FileTime(50.0 - len(name), 300.0, "new"),) for name in first}
    for made in (None, 200.0):
        second = plan(2, merge(before, saved), commit_time=made)
        assert sorted(first + second) == sorted(before)
    # Another commit's run (say, the previous push of the branch) saving meanwhile.
    meanwhile = {name: (FileTime(50.0 - len(name), 300.0, "other"),) for name in first}
    second = plan(2, merge(before, meanwhile), commit_time=200.0)
    assert sorted(first + second) == sorted(before)
    # Without the commit's time to go by, such a run's numbers would move the split.
    moved = plan(2, merge(before, meanwhile), commit_time=None)
    assert sorted(first + moved) != sorted(before)


def test_local_nodes_split_by_the_newest_timings(tmp_path: Path) -> None:
    """One process plans every local node: the last run's seconds, this commit's too."""
    uneven_suite(tmp_path, {"test_a.py": 0.1, "test_b.py": 0.1})
    last_run = one_each({"tests/test_a.py": FileTime(2.0, 300.0, "new"),
                         "tests/test_b.py": FileTime(1.0, 300.0, "new")})
    local = settings_in(tmp_path, LAYERKEEP_TEST_FILES="tests/*.py", LAYERKEEP_COMMIT="new",
                        LAYERKEEP_TEST_NODES="2")
    plan = plan_tests(local, last_run, log=print, commit_time=200.0)
    assert plan.basis == f"timings of 2/2 files ({history_digest(latest(last_run))})"


def test_a_commit_time_comes_from_git(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    environ = {**os.environ, "GIT_COMMITTER_DATE": "1700000000 +0000"}
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
                    "commit", "-q", "--allow-empty", "-m", "x"], check=True, env=environ)
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
    assert commit_time(tmp_path, head) == 1700000000.0
    assert commit_time(tmp_path, "0" * 40) is None
    assert commit_time(tmp_path, "--all") is None
    assert commit_time(tmp_path, "") is None


# --- the history in the cache folder --------------------------------------------------------


def test_the_cache_folder_keeps_and_merges_the_history(tmp_path: Path) -> None:
    settings = settings_in(tmp_path, LAYERKEEP_CACHE_DIR="cache")
    lines: list[str] = []
    assert load_history(settings, {}, log=lines.append) == {}
    first = one_each({"a.py": FileTime(1.0, 10.0), "b.py": FileTime(2.0, 10.0)})
    assert save_history(settings, {}, first, node=Node(1, 2), keep={"a.py", "b.py"},
                        log=lines.append)
    second = one_each({"b.py": FileTime(5.0, 20.0), "c.py": FileTime(1.0, 20.0)})
    # a.py is gone from the project: its timing goes too.
    assert save_history(settings, {}, second, node=Node(2, 2), keep={"b.py", "c.py"},
                        log=lines.append)
    assert load_history(settings, {}, log=lines.append) == one_each(
        {"b.py": FileTime(5.0, 20.0), "c.py": FileTime(1.0, 20.0)})
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == [
        ".lock", TIMINGS_FILE]
    assert lines == []
    (tmp_path / "cache" / TIMINGS_FILE).write_text("{damaged")
    assert load_history(settings, {}, log=lines.append) is None
    assert lines == [f"warning: ignored the damaged test timings in {tmp_path}/cache/"
                     f"{TIMINGS_FILE} (Expecting property name enclosed in double quotes: "
                     "line 1 column 2 (char 1))"]


def test_an_unwritable_cache_folder_is_a_warning(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the folder belongs")
    settings = settings_in(tmp_path, LAYERKEEP_CACHE_DIR="cache")
    lines: list[str] = []
    saved = save_history(settings, {}, one_each({"a.py": FileTime(1.0, 1.0)}), node=Node(1, 1),
                         keep={"a.py"}, log=lines.append)
    assert not saved
    assert len(lines) == 1
    assert lines[0].startswith("warning: test timings not saved, later splits balance by "
                               "older ones: ")


# --- reports named by node ------------------------------------------------------------------


def test_reports_are_named_by_node(tmp_path: Path) -> None:
    outbox, reports = tmp_path / "outbox", tmp_path / "reports"
    (outbox / "htmlcov").mkdir(parents=True)
    (outbox / "junit.xml").write_text("<testsuite/>")
    (outbox / "htmlcov" / "index.html").write_text("")
    reports.mkdir()
    moved = move_reports(outbox, reports, print, rename="-node2")
    assert moved == [reports / "htmlcov-node2" / "index.html", reports / "junit-node2.xml"]


# --- the history in the registry cache ------------------------------------------------------


def test_the_registry_keeps_every_nodes_timings_in_the_branch_scope(tmp_path: Path) -> None:
    """Each node pushes its own tag; a later run reads and merges them all."""
    with running_registry(tmp_path / "registry") as registry:

        def on(branch: str, **extra: str) -> Settings:
            return settings_in(tmp_path, **{
                "LAYERKEEP_CACHE_BACKEND": "registry", "LAYERKEEP_REGISTRY": registry.address,
                "LAYERKEEP_BRANCH": branch, "LAYERKEEP_CACHE_FALLBACK_BRANCH": "main",
                "LAYERKEEP_PUSH_RETRIES": "1", **extra,
            })

        lines: list[str] = []
        feature = on("feature")
        assert load_history(feature, {}, log=lines.append) == {}  # no cache repository yet
        first = one_each({"a.py": FileTime(1.0, 10.0), "b.py": FileTime(2.0, 10.0)})
        second = one_each({"b.py": FileTime(3.0, 20.0), "c.py": FileTime(4.0, 20.0)})
        keep = {"a.py", "b.py", "c.py"}
        assert save_history(feature, {}, first, node=Node(1, 2), keep=keep, log=lines.append)
        assert save_history(feature, {}, second, node=Node(2, 2), keep=keep, log=lines.append)
        merged = one_each({"a.py": FileTime(1.0, 10.0), "b.py": FileTime(3.0, 20.0),
                           "c.py": FileTime(4.0, 20.0)})
        assert load_history(feature, {}, log=lines.append) == merged
        _, listed, _ = registry.get("/v2/app-cache/tags/list")
        assert sorted(listed["tags"]) == ["feature--latest-test-timings-1",
                                          "feature--latest-test-timings-2"]
        # Another branch reads its own scope, else the fallback branch's: none here.
        assert load_history(on("other"), {}, log=lines.append) == {}
        from_feature = on("newer", LAYERKEEP_CACHE_FALLBACK_BRANCH="feature")
        assert load_history(from_feature, {}, log=lines.append) == merged
        read_only = on("feature", LAYERKEEP_CACHE_READ_ONLY="yes")
        assert not save_history(read_only, {}, first, node=Node(1, 1), keep=keep,
                                log=lines.append)
        assert lines == ["test timings of 2 file(s) saved as "
                         f"{registry.address}/app-cache:feature--latest-test-timings-1",
                         "test timings of 2 file(s) saved as "
                         f"{registry.address}/app-cache:feature--latest-test-timings-2",
                         "test timings not saved: the registry cache is read-only here "
                         "(LAYERKEEP_CACHE_READ_ONLY=yes)"]
        lines.clear()
        registry.stop()
        assert load_history(feature, {}, log=lines.append) is None
        assert len(lines) == 1
        assert lines[0].startswith(f"warning: cannot read the test timings in "
                                   f"{registry.address}/app-cache: ")
