"""The CI configurations: valid under their published schemas, and wired to layerkeep.

The schemas are the ones vendored in check-jsonschema, so these tests run offline, and
a guard makes sure they do: check-jsonschema runs with an audit hook that refuses any
name lookup or socket connection. No Docker is needed.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from layerkeep.core.settings import KNOWN

ROOT = Path(__file__).resolve().parent.parent
CIRCLE = ROOT / "circle.yml"
CIRCLE_READ = ROOT / ".circleci" / "config.yml"
GITHUB = ROOT / ".github" / "workflows" / "ci.yml"
GITLAB = ROOT / ".gitlab-ci.yml"

CACHE_DIR = ".layerkeep-cache"

# check-jsonschema's arguments for each file, as its pre-commit hooks pass them.
SCHEMA_ARGS: dict[str, tuple[str, ...]] = {
    "circle-ci": ("--builtin-schema", "vendor.circle-ci"),
    "github-workflows": ("--builtin-schema", "vendor.github-workflows"),
    "gitlab-ci": (
        "--builtin-schema",
        "vendor.gitlab-ci",
        "--data-transform",
        "gitlab-ci",
        "--regex-variant",
        "nonunicode",
    ),
}
CONFIGS: list[tuple[Path, str]] = [
    (CIRCLE, "circle-ci"),
    (CIRCLE_READ, "circle-ci"),
    (GITHUB, "github-workflows"),
    (GITLAB, "gitlab-ci"),
]

# `python -m check_jsonschema ARGS`, with an audit hook that makes any network access
# (a name lookup or a socket connection) raise instead of happening.
OFFLINE_CHECK_JSONSCHEMA = """
import runpy
import sys

NETWORK_EVENTS = {
    "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
    "socket.gethostbyaddr", "socket.connect", "socket.sendto",
}

def refuse_network(event, args):
    if event in NETWORK_EVENTS:
        raise RuntimeError(f"network access attempted: {event} {args!r}")

sys.addaudithook(refuse_network)
sys.argv = ["check-jsonschema", *sys.argv[1:]]
runpy.run_module("check_jsonschema", run_name="__main__", alter_sys=True)
"""
NETWORK_ATTEMPT = "network access attempted"


def check_jsonschema(*args: str | Path, cache_home: Path) -> subprocess.CompletedProcess[str]:
    """Run check-jsonschema offline; its schema cache (if it wanted one) goes to cache_home."""
    return subprocess.run(
        [sys.executable, "-c", OFFLINE_CHECK_JSONSCHEMA, *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cache_home), "XDG_CACHE_HOME": str(cache_home)},
        timeout=300,
    )


def load(path: Path) -> dict[str, Any]:
    """The file parsed as YAML 1.2 (so GitHub's `on:` stays a string, not True)."""
    data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path.name}: not a mapping at the top"
    return data


def mapping(value: object, what: str) -> dict[str, Any]:
    assert isinstance(value, dict), f"{what}: expected a mapping, got {value!r}"
    return value


def sequence(value: object, what: str) -> list[Any]:
    assert isinstance(value, list), f"{what}: expected a list, got {value!r}"
    return value


def runs_inv_ci(script: str) -> bool:
    """Whether a shell script has `inv ci` as one of its command lines."""
    return re.search(r"(?m)^\s*inv ci\s*$", script) is not None


def installs_layerkeep(script: str) -> bool:
    """Whether a shell script installs this checkout with pip (`pip install ... -e .`)."""
    return re.search(r"(?m)\bpip install\b.*\s-e \.\s*$", script) is not None


def assert_known_settings(environment: dict[str, Any], where: str) -> None:
    """layerkeep stops on an unknown LAYERKEEP_ variable, so a typo would break the job."""
    for key in environment:
        if key.startswith("LAYERKEEP_"):
            assert key in KNOWN, f"{where}: {key} is not a layerkeep setting"


def mutated_copy(source: Path, old: str, new: str, folder: Path) -> Path:
    """A copy of source with `old` (which occurs exactly once) replaced by `new`."""
    text = source.read_text(encoding="utf-8")
    assert text.count(old) == 1, f"{source.name}: {old!r} should occur exactly once"
    copy = folder / source.name
    copy.write_text(text.replace(old, new), encoding="utf-8")
    return copy


# --- the published schemas


@pytest.mark.parametrize(
    ("path", "schema"), CONFIGS, ids=[str(p.relative_to(ROOT)) for p, _ in CONFIGS]
)
def test_config_is_valid_under_its_schema(path: Path, schema: str, tmp_path: Path) -> None:
    done = check_jsonschema(*SCHEMA_ARGS[schema], path, cache_home=tmp_path)
    output = done.stdout + done.stderr
    assert NETWORK_ATTEMPT not in output
    assert done.returncode == 0, output
    assert "ok -- validation done" in done.stdout


@pytest.mark.parametrize(
    ("source", "schema", "old", "new"),
    [
        (CIRCLE, "circle-ci", "\nversion: 2.1\n", "\nversion: 1\n"),
        (CIRCLE, "circle-ci", "          paths:\n", "          pathz:\n"),
        (GITHUB, "github-workflows", "    runs-on:", "    runs_on:"),
        (GITLAB, "gitlab-ci", "\n  script:\n", "\n  scirpt:\n"),
    ],
    ids=["circle-version-1", "circle-save_cache-pathz", "github-runs_on", "gitlab-scirpt"],
)
def test_schema_rejects_a_broken_copy(
    source: Path, schema: str, old: str, new: str, tmp_path: Path
) -> None:
    broken = mutated_copy(source, old, new, tmp_path)
    done = check_jsonschema(*SCHEMA_ARGS[schema], broken, cache_home=tmp_path)
    output = done.stdout + done.stderr
    assert NETWORK_ATTEMPT not in output
    assert done.returncode == 1, output
    assert "Schema validation errors were encountered" in output


def test_the_offline_guard_catches_a_download(tmp_path: Path) -> None:
    """A remote schema would be downloaded: the guard must stop that before any traffic."""
    done = check_jsonschema(
        "--no-cache",
        "--schemafile",
        "http://127.0.0.1:9/layerkeep-test-schema.json",
        CIRCLE,
        cache_home=tmp_path,
    )
    assert done.returncode != 0
    assert NETWORK_ATTEMPT in done.stdout + done.stderr


# --- CircleCI


def test_circle_yml_is_what_circleci_reads() -> None:
    assert CIRCLE.read_bytes() == CIRCLE_READ.read_bytes()


def test_circle_yml_says_why_it_is_not_read() -> None:
    head = CIRCLE.read_text(encoding="utf-8").split("\nversion:", 1)[0]
    assert "CircleCI 1.0" in head
    assert "2018" in head


def circle_job() -> tuple[dict[str, Any], list[Any]]:
    config = load(CIRCLE)
    assert str(config["version"]) == "2.1"
    jobs = mapping(config["jobs"], "jobs")
    assert len(jobs) == 1, "one CI job"
    ((name, job),) = jobs.items()
    workflows = mapping(config["workflows"], "workflows")
    invoked = [
        entry if isinstance(entry, str) else next(iter(entry))
        for workflow in workflows.values()
        for entry in sequence(mapping(workflow, "workflow")["jobs"], "workflow jobs")
    ]
    assert name in invoked, "a workflow runs the job"
    job = mapping(job, name)
    return job, sequence(job["steps"], "steps")


def circle_steps(steps: list[Any], kind: str) -> list[dict[str, Any]]:
    return [mapping(step[kind], kind) for step in steps if isinstance(step, dict) and kind in step]


def test_circle_job_runs_inv_ci_on_a_machine_with_full_history() -> None:
    job, steps = circle_job()
    assert "machine" in job, "a real Docker engine: the machine executor"
    assert steps[0] == "checkout", "a plain checkout is a full clone"
    runs = [
        run if isinstance(run, str) else run["command"]
        for run in (step["run"] for step in steps if isinstance(step, dict) and "run" in step)
    ]
    assert any(runs_inv_ci(script) for script in runs)
    assert any(installs_layerkeep(script) for script in runs)
    assert_known_settings(mapping(job.get("environment", {}), "environment"), "circle.yml")


def test_circle_job_restores_and_saves_the_layer_cache() -> None:
    job, steps = circle_job()
    environment = mapping(job.get("environment", {}), "environment")
    cache_dir = environment.get("LAYERKEEP_CACHE_DIR", CACHE_DIR)
    assert cache_dir == CACHE_DIR

    (restore,) = circle_steps(steps, "restore_cache")
    keys = sequence(restore["keys"], "restore_cache keys")
    assert len(keys) >= 2, "restore falls back to older caches"
    for narrower, wider in itertools.pairwise(keys):
        assert narrower.startswith(wider), f"{wider!r} should be a prefix of {narrower!r}"

    (save,) = circle_steps(steps, "save_cache")
    assert save["key"] == keys[0], "a rerun of this revision restores what it saved"
    assert sequence(save["paths"], "save_cache paths") == [cache_dir]
    assert save["when"] == "always", "layerkeep saves before the tests; keep a red run's cache"

    order = [next(iter(step)) if isinstance(step, dict) else step for step in steps]
    assert order.index("restore_cache") < order.index("save_cache")


def test_circle_job_publishes_the_reports() -> None:
    job, steps = circle_job()
    reports = mapping(job["environment"], "environment")["LAYERKEEP_REPORTS_DIR"]
    for kind in ("store_test_results", "store_artifacts"):
        (step,) = circle_steps(steps, kind)
        assert step["path"] == reports, kind
        assert step["when"] == "always", kind


# --- GitHub Actions


def github_job() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    workflow = load(GITHUB)
    assert "on" in workflow, "YAML 1.2: `on` is a key, not True"
    jobs = mapping(workflow["jobs"], "jobs")
    assert len(jobs) == 1, "one CI job"
    (job,) = jobs.values()
    job = mapping(job, "job")
    environment = {**workflow.get("env", {}), **job.get("env", {})}
    steps = [mapping(step, "step") for step in sequence(job["steps"], "steps")]
    return job, environment, steps


def uses(steps: list[dict[str, Any]], action: str) -> list[dict[str, Any]]:
    return [step for step in steps if str(step.get("uses", "")).split("@")[0] == action]


def test_github_job_runs_inv_ci_with_full_history() -> None:
    job, environment, steps = github_job()
    assert str(job["runs-on"]).startswith("ubuntu-"), "Ubuntu runners have a Docker engine"
    (checkout,) = uses(steps, "actions/checkout")
    assert checkout["with"]["fetch-depth"] == 0, "git.touch needs the whole history"
    (python,) = uses(steps, "actions/setup-python")
    assert str(python["with"]["python-version"]) == "3.11"
    runs = [str(step["run"]) for step in steps if "run" in step]
    assert any(runs_inv_ci(script) for script in runs)
    assert any(installs_layerkeep(script) for script in runs)
    assert_known_settings(environment, ".github/workflows/ci.yml")


def test_github_job_restores_and_saves_the_layer_cache() -> None:
    _, environment, steps = github_job()
    cache_dir = environment.get("LAYERKEEP_CACHE_DIR", CACHE_DIR)
    assert cache_dir == CACHE_DIR
    (restore,) = uses(steps, "actions/cache/restore")
    (save,) = uses(steps, "actions/cache/save")
    assert restore["with"]["path"] == save["with"]["path"] == cache_dir
    key = restore["with"]["key"]
    assert save["with"]["key"] == key
    assert "github.run_id" in key, "each run saves a new entry: entries cannot be replaced"
    prefixes = str(restore["with"]["restore-keys"]).splitlines()
    assert prefixes, "restore falls back to the newest older entry"
    assert all(key.startswith(prefix) for prefix in prefixes)
    assert save["if"] == "always()", "layerkeep saves before the tests; keep a red run's cache"
    assert steps.index(restore) < steps.index(save)


def test_github_job_uploads_the_reports() -> None:
    _, environment, steps = github_job()
    (upload,) = uses(steps, "actions/upload-artifact")
    assert upload["if"] == "always()"
    assert Path(upload["with"]["path"]) == Path(environment["LAYERKEEP_REPORTS_DIR"])


# --- GitLab CI


def gitlab_job() -> dict[str, Any]:
    config = load(GITLAB)
    jobs = [
        mapping(value, name)
        for name, value in config.items()
        if isinstance(value, dict) and "script" in value
    ]
    assert len(jobs) == 1, "one CI job"
    return jobs[0]


def test_gitlab_job_runs_inv_ci_against_dind_with_full_history() -> None:
    job = gitlab_job()
    assert str(job["image"]).startswith("python:3.11")
    services = [
        service if isinstance(service, str) else service["name"]
        for service in sequence(job["services"], "services")
    ]
    assert any(str(name).startswith("docker:") and "dind" in name for name in services)
    variables = mapping(job["variables"], "variables")
    assert variables["DOCKER_HOST"] == "tcp://docker:2375"
    assert variables["DOCKER_TLS_CERTDIR"] == ""
    assert str(variables["GIT_DEPTH"]) == "0", "git.touch needs the whole history"
    scripts = [*job.get("before_script", []), *job["script"]]
    assert any(runs_inv_ci(str(line)) for line in job["script"])
    assert any(installs_layerkeep(str(line)) for line in scripts)
    assert_known_settings(variables, ".gitlab-ci.yml")


def test_gitlab_job_caches_the_layer_cache_per_branch() -> None:
    job = gitlab_job()
    cache_dir = job["variables"].get("LAYERKEEP_CACHE_DIR", CACHE_DIR)
    assert cache_dir == CACHE_DIR
    cache = mapping(job["cache"], "cache")
    assert "$CI_COMMIT_REF_SLUG" in cache["key"]
    assert sequence(cache["paths"], "cache paths") == [cache_dir]
    assert cache.get("policy", "pull-push") == "pull-push"
    assert cache["when"] == "always", "layerkeep saves before the tests; keep a red run's cache"


def test_gitlab_job_publishes_junit_reports() -> None:
    job = gitlab_job()
    reports = Path(job["variables"]["LAYERKEEP_REPORTS_DIR"])
    artifacts = mapping(job["artifacts"], "artifacts")
    assert artifacts["when"] == "always"
    junit = artifacts["reports"]["junit"]
    for pattern in [junit] if isinstance(junit, str) else junit:
        assert Path(pattern).parent == reports
        assert pattern.endswith(".xml")
