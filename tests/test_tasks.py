"""The Invoke layer: what `inv` shows, one-line errors, and reuse from another project."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import uuid
import venv
from pathlib import Path

import pytest
from clean_env import clean_environ

from layerkeep.core.settings import FLAGS
from layerkeep.tasks import ns

REPO = Path(__file__).resolve().parent.parent
INV = [sys.executable, "-m", "invoke"]
TASKS = (
    "git.touch", "cache.load", "cache.save", "image.build", "services.up", "services.down",
    "services.sweep", "db.init", "test.run", "release.push", "ci", "standins.build",
)

PROJECT_TASKS = '''\
from invoke import task

from layerkeep.tasks import git_tasks


@task(pre=[git_tasks.touch])
def announce(c):
    """A project's own step, after layerkeep's git.touch."""
    print("announced after touch")
'''

PROJECT_ROOT = '''\
from layerkeep.tasks import ns

import shipping

ns.add_collection(shipping)
'''


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, check=False, env=clean_environ(**env)
    )


def test_repository_collection_lists_its_namespaces() -> None:
    listing = run([*INV, "--list"], REPO)
    assert listing.returncode == 0, listing.stderr
    for name in TASKS:
        assert name in listing.stdout


def test_every_task_flag_has_help() -> None:
    for task in TASKS:
        shown = run([*INV, "--help", task], REPO)
        assert shown.returncode == 0, shown.stderr
        options = [line for line in shown.stdout.splitlines() if line.strip().startswith("-")]
        assert all(len(line.split(None, 1)) == 2 for line in options), (task, options)


def test_setting_flags_take_their_help_from_their_setting() -> None:
    """Each setting flag a task takes shows its setting's doc and name: declared once."""
    seen = set()
    for name in ns.task_names:
        flags = getattr(ns[name], "flags", ())
        if not flags:
            continue
        options = run([*INV, "--help", name], REPO).stdout.split("Options:", 1)[1]
        # Each option's lines, joined: "-i STRING, --image=STRING  Repository ..."
        shown = " ".join(options.split()).replace(" -", "\n-").splitlines()
        for key in flags:
            line = next(each for each in shown if f"{key.flag}=" in each or f"{key.flag} " in each)
            assert " ".join(key.doc.rstrip(".").split()) in line, (name, line)
            assert key.name in line, (name, line)
            seen.add(key.flag)
    assert seen == set(FLAGS)


@pytest.mark.parametrize(
    ("env_file", "expected"),
    [
        ("LAYERKEEP_BULDER=legacy\n", "did you mean LAYERKEEP_BUILDER?"),
        ("LAYERKEEP_IMAGE=app\nnot a line\n", ".env: line 2 is not KEY=VALUE"),
        ("LAYERKEEP_BUILDER=fast\n", "allowed: auto, legacy, buildkit"),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(
    tmp_path: Path, env_file: str, expected: str
) -> None:
    (tmp_path / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    (tmp_path / ".env").write_text(env_file)
    done = run([*INV, "cache.save"], tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("layerkeep: ")
    assert expected in lines[0]


def test_flags_override_settings_and_are_checked(tmp_path: Path) -> None:
    make_user_project(tmp_path)
    (tmp_path / "Dockerfile").write_text("FROM python:3.11-slim\n")
    done = run([*INV, "image.build", "--builder", "podman"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("layerkeep: image.build: LAYERKEEP_BUILDER=")
    assert "(from flag --builder)" in done.stderr
    assert "Traceback" not in done.stderr
    # Checked before anything starts: git.touch, image.build's prerequisite, never ran.
    assert "==>" not in done.stdout


COMMIT_DATES = {"GIT_COMMITTER_DATE": "@1600000000 +0000", "GIT_AUTHOR_DATE": "@1600000000 +0000"}


def make_user_project(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "shipping.py").write_text(PROJECT_TASKS)
    (folder / "tasks.py").write_text(PROJECT_ROOT)
    (folder / "README").write_text("a project\n")
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one"],
    ):
        subprocess.run(command, cwd=folder, check=True, env={**os.environ, **COMMIT_DATES})


def test_another_project_adds_its_own_tasks_around_ours(tmp_path: Path) -> None:
    make_user_project(tmp_path)
    listing = run([*INV, "--list"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "shipping.announce" in listing.stdout
    assert "git.touch" in listing.stdout
    done = run([*INV, "shipping.announce"], tmp_path)
    assert done.returncode == 0, done.stderr
    touched, announced = done.stdout.index("touched 3 files"), done.stdout.index("announced")
    assert touched < announced
    assert (tmp_path / "README").stat().st_mtime == 1600000000


def test_installed_package_carries_the_collection(tmp_path: Path) -> None:
    """A real (non-editable) install, as `pip install layerkeep` from a path gives."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # The dependencies come from wherever this interpreter has them (a venv, the user's
    # site, the system), behind the venv's own packages: no download, and layerkeep
    # itself is the fresh install, not this checkout.
    inner_site = run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], tmp_path)
    paths = [*site.getsitepackages(), site.getusersitepackages()]
    (Path(inner_site.stdout.strip()) / "outer.pth").write_text("\n".join(paths) + "\n")
    # From a copy of the source: pip writes its egg-info beside pyproject.toml, and the
    # checkout may be read-only (another user's, as in CI's non-root run).
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "reports", ".layerkeep-cache"))
    install = run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)], tmp_path)
    assert install.returncode == 0, install.stderr
    where = run([str(python), "-c", "import layerkeep.tasks as t; print(t.__file__)"], tmp_path)
    assert where.stdout.strip().startswith(str(env_dir))
    project = tmp_path / "project"
    make_user_project(project)
    listing = run([str(python), "-m", "invoke", "--list"], project)
    assert listing.returncode == 0, listing.stderr
    assert "shipping.announce" in listing.stdout
    assert "image.build" in listing.stdout


def test_unreachable_engine_is_one_line_saying_where_and_how(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    done = run([*INV, "cache.load"], tmp_path, DOCKER_HOST="unix:///tmp/no-such-docker.sock")
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    where = "DOCKER_HOST=unix:///tmp/no-such-docker.sock"
    assert f"cannot reach the Docker engine at {where}" in lines[0]
    assert "dockerd" in lines[0]


def test_settings_view_shows_values_origins_and_masks_secrets(tmp_path: Path) -> None:
    (tmp_path / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    (tmp_path / "layerkeep.env").write_text(
        "LAYERKEEP_IMAGE=myorg/app\nLAYERKEEP_REGISTRY_PASSWORD=hunter2-token\n"
    )
    done = run([*INV, "settings"], tmp_path, LAYERKEEP_BUILDER="legacy")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    image = next(line for line in lines if line.startswith("LAYERKEEP_IMAGE "))
    assert image.endswith(f"({tmp_path / 'layerkeep.env'}:1)")
    builder = next(line for line in lines if line.startswith("LAYERKEEP_BUILDER "))
    assert builder.split()[1:] == ["legacy", "(environment)"]
    assert "hunter2-token" not in done.stdout
    assert any(line.startswith("LAYERKEEP_REGISTRY_PASSWORD ") for line in lines)
    assert "LAYERKEEP_CACHE_LEVEL" not in done.stdout
    everything = run([*INV, "settings", "--all-keys"], tmp_path)
    assert "LAYERKEEP_CACHE_LEVEL" in everything.stdout
    help_text = run([*INV, "--help", "ci"], tmp_path)
    assert "`inv settings` shows each value" in help_text.stdout


@pytest.mark.docker
@pytest.mark.parametrize("builder", ["legacy", "buildkit"])
def test_build_output_masks_secret_build_args(
    tmp_path: Path, builder: str, unique_repository: str
) -> None:
    """BuildKit echoes RUN lines with build arguments filled in: the log masks them."""
    secret = f"s3cr3t-{uuid.uuid4().hex[:12]}"
    make_user_project(tmp_path)
    (tmp_path / "Dockerfile").write_text(
        f"FROM python:3.11-slim\nLABEL run={uuid.uuid4().hex}\n"
        'ARG API_TOKEN\nRUN echo "token is $API_TOKEN"\n'
    )
    done = run(
        [*INV, "image.build", "--builder", builder],
        tmp_path,
        LAYERKEEP_IMAGE=f"{unique_repository}/app",
        LAYERKEEP_BUILD_ARGS=f"API_TOKEN={secret}",
        LAYERKEEP_CACHE_DIR=str(tmp_path.parent / f"{tmp_path.name}-cache"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    assert "token is" in done.stdout
    assert secret not in done.stdout + done.stderr
