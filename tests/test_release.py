"""release.push against a real registry, and the tag rules it follows.

The tag and plan tests are fast (no engine); the ones marked ``docker`` push to a real
Docker Distribution registry on 127.0.0.1, with and without htpasswd auth.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import random
import re
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from clean_env import clean_environ
from registry_setup import Registry, running_registry

from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError, DockerOperationError
from layerkeep.core.imageref import is_valid_tag
from layerkeep.core.registry_credentials import Credentials
from layerkeep.core.registry_failures import (
    RegistryAuthError,
    RegistryUnavailable,
    TagNotFound,
    classify,
    with_retries,
)
from layerkeep.core.secrets import MASK
from layerkeep.core.settings import Settings, load_settings
from layerkeep.core.tag_names import safe_tag
from layerkeep.release.push import branch_tag, plan_release, push_release

docker = pytest.mark.docker  # the fast tests here need no engine
INV = [sys.executable, "-m", "invoke"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PASSWORD = "pa55-w0rd/with:odd@chars"  # noqa: S105 - the test registry's
# Works before and after the release namespace is wired into layerkeep.tasks.
TASKS_PY = """\
from invoke.collection import Collection

from layerkeep.tasks import ns, release_tasks

if "release" not in ns.collections:
    ns.add_collection(Collection.from_module(release_tasks), "release")
"""


def settings_for(folder: Path, **values: str) -> Settings:
    environ = {f"LAYERKEEP_{key.upper()}": value for key, value in values.items()}
    return load_settings(folder, environ, git_facts=lambda _: GitFacts("", ""))


def quiet(_: str) -> None:
    pass


def hashed(name: str) -> str:
    """The short hash safe_tag appends to a name it had to change."""
    return hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]


# --- tags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("branch", "tag"),
    [
        ("main", "main"),
        ("v1.2.0", "v1.2.0"),
        ("Feature-A", "Feature-A"),  # valid as it is: case kept, no hash
        ("feature--a", "feature--a"),
        ("feature/Login_2", "feature-login_2-"),
        ("Release/1.2.0", "release-1.2.0-"),
        ("user//many///slashes", "user-many-slashes-"),
        ("..hidden", "hidden-"),
        ("--dashed-", "dashed-"),
        ("-.-x", "x-"),
        ("café/Ünïcode", "cafe-unicode-"),
        ("fix: spaces & symbols!", "fix-spaces-symbols-"),
        ("latest", "latest-"),
        ("LATEST", "latest-"),
        # Valid, but shaped like a hashed tag: hashed again, so it meets no other name's.
        ("fix-0123456789", "fix-0123456789-"),
    ],
)
def test_branch_names_become_readable_tags(branch: str, tag: str) -> None:
    """A valid name stays as it is; a changed one ends with a hash of the original."""
    expected = tag + hashed(branch) if tag.endswith("-") else tag
    assert branch_tag(branch) == expected


def test_branches_that_read_alike_never_share_a_tag() -> None:
    names = ["feature/a", "feature-a", "Feature/A", "feature--a", "FEATURE-A", "feature_a"]
    tags = [branch_tag(name) for name in names]
    assert len(set(tags)) == len(names), tags
    assert tags[1] == "feature-a"
    assert tags[0] == f"feature-a-{hashed('feature/a')}"
    assert tags[2] == f"feature-a-{hashed('Feature/A')}"
    # A branch literally named like another's hashed tag does not take that tag.
    assert branch_tag(tags[0]) != tags[0]


def _random_name(rng: random.Random) -> str:
    """Branch-like names, unicode and bytes-ish: near-valid ones most often."""
    alphabets = [
        "abAB-_./",
        "aA0-_.",
        "".join(map(chr, range(32, 127))),
        "éÜß日本語🚀\u0301\x00\t\n\udc80\udcff",
    ]
    length = rng.choice([0, 1, 2, 3, 5, 8, 20, 127, 128, 129, 200])
    return "".join(rng.choice(rng.choice(alphabets)) for _ in range(length))


def test_fuzzed_names_give_valid_distinct_tags_never_latest() -> None:
    rng = random.Random(20261130)  # noqa: S311 - seeded, so a failure repeats
    names = {_random_name(rng) for _ in range(5000)}
    names |= {name.upper() for name in list(names)[:500]}
    names |= {"latest", "Latest", "LATEST", "latest-" + hashed("latest")}
    tags: dict[str, str] = {}
    for name in names:
        tag = branch_tag(name)
        assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag), (name, tag)
        assert is_valid_tag(tag)
        assert tag.lower() != "latest"
        assert branch_tag(name) == tag  # the same name always gets the same tag
        assert tags.setdefault(tag, name) == name, f"{name!r} and {tags[tag]!r} share {tag}"
    assert len(tags) == len(names) > 4000


@pytest.mark.parametrize("branch", ["", "/", "...", "-", "日本語", "🚀"])
def test_branches_with_nothing_usable_get_a_hashed_tag(branch: str) -> None:
    tag = branch_tag(branch)
    assert re.fullmatch(r"branch-[0-9a-f]{10}", tag), tag
    assert is_valid_tag(tag)


def test_dropped_letters_keep_branches_apart() -> None:
    assert branch_tag("日本語") != branch_tag("中文")
    # Letters without a transliteration are dropped, so a hash marks what was there.
    assert branch_tag("feature/日本") != branch_tag("feature")
    assert branch_tag("feature/日本").startswith("feature-")


def test_long_branch_names_are_shortened_and_never_share_a_tag() -> None:
    prefix = "feature/" + "very-long-name-" * 20
    first, second = prefix + "one", prefix + "two"
    assert len(first) > 300
    tags = branch_tag(first), branch_tag(second)
    assert tags[0] != tags[1]
    for tag in tags:
        assert len(tag) <= 128
        assert is_valid_tag(tag)
        assert tag.startswith("feature-very-long-name-very-long-name")
    # The same name always gives the same tag: a branch's pushes land on one tag.
    assert branch_tag(first) == tags[0]
    assert branch_tag("x" * 128) == "x" * 128
    assert len(branch_tag("x" * 129)) == 128


@pytest.mark.parametrize(
    "name",
    ["a" * 300, "." * 300, "-a" * 200, "Ä" * 200, "a/" * 150, "x\ty\nz", "v1.0+build.5", "_x"],
)
def test_any_name_gives_a_valid_tag(name: str) -> None:
    assert is_valid_tag(safe_tag(name))


# --- plan --------------------------------------------------------------------------------


def test_empty_registry_means_nothing_to_push(tmp_path: Path) -> None:
    plan = plan_release(settings_for(tmp_path))
    assert not plan.pushes
    assert plan.describe() == "release: LAYERKEEP_REGISTRY is empty: nothing to push"


def test_plan_tags_commit_branch_latest_and_release_tags(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, image="myorg/app:dev", registry="127.0.0.1:5000", commit=COMMIT,
        branch="main", release_latest_branch="main",
        release_tags="{git_tag},v{git_tag}-final,stable",
    )
    plan = plan_release(settings, git_tag=lambda _: "1.2.0")
    assert plan.pushes
    assert plan.repository == "127.0.0.1:5000/myorg/app"
    assert plan.source == "myorg/app:dev"
    assert plan.tags == (COMMIT, "main", "latest", "1.2.0", "v1.2.0-final", "stable")
    assert plan.who == "no user set: docker login"

    no_tag = plan_release(settings, git_tag=lambda _: "")
    assert no_tag.tags == (COMMIT, "main", "latest", "stable")


def test_git_tag_comes_from_head_and_is_made_a_valid_tag(tmp_path: Path) -> None:
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    settings = settings_for(
        tmp_path, image="app", registry="r.example:5000", commit=COMMIT, branch="main",
        release_tags="{git_tag}",
    )
    assert plan_release(settings).tags == (COMMIT, "main")
    subprocess.run([*git, "tag", "release/2.0"], check=True)
    assert plan_release(settings).tags == (COMMIT, "main", f"release-2.0-{hashed('release/2.0')}")


def test_plan_replaces_a_registry_host_in_the_image(tmp_path: Path) -> None:
    settings = settings_for(
        tmp_path, image="ghcr.io/org/app", registry="127.0.0.1:5000", commit=COMMIT,
        branch="feature/Login_2", registry_user="alice", registry_password=PASSWORD,
    )
    plan = plan_release(settings)
    assert plan.repository == "127.0.0.1:5000/org/app"
    assert plan.tags == (COMMIT, f"feature-login_2-{hashed('feature/Login_2')}")
    assert plan.who == "user alice"
    assert PASSWORD not in repr(plan) + plan.describe() + repr(settings)


@pytest.mark.parametrize(
    ("branch", "pushes"),
    [("main", True), ("release/1.2", True), ("feature/x", False), ("mainline", False)],
)
def test_only_matching_branches_are_pushed(tmp_path: Path, branch: str, pushes: bool) -> None:
    settings = settings_for(
        tmp_path, image="app", registry="127.0.0.1:5000", commit=COMMIT, branch=branch,
        release_branches="main,release/*",
    )
    plan = plan_release(settings)
    assert plan.pushes is pushes
    if not pushes:
        assert f"branch {branch!r} matches none of LAYERKEEP_RELEASE_BRANCHES" in plan.reason
        assert plan.describe().startswith("release: not pushing app:latest to 127.0.0.1:5000/app")


def test_plan_problems_are_config_errors(tmp_path: Path) -> None:
    no_commit = settings_for(tmp_path, image="app", registry="r.example", branch="main")
    with pytest.raises(ConfigError, match="no commit SHA"):
        plan_release(no_commit)
    bad_tag = settings_for(
        tmp_path, image="app", registry="r.example", branch="main", commit=COMMIT,
        release_tags="release {version}",
    )
    with pytest.raises(ConfigError, match="LAYERKEEP_RELEASE_TAGS"):
        plan_release(bad_tag)
    detached = settings_for(tmp_path, image="app", registry="r.example", commit=COMMIT)
    assert "set LAYERKEEP_BRANCH" in plan_release(detached).reason
    password_only = settings_for(
        tmp_path, image="app", registry="r.example", branch="main", commit=COMMIT,
        registry_password=PASSWORD,
    )
    with pytest.raises(ConfigError, match="LAYERKEEP_REGISTRY_USER is empty") as raised:
        plan_release(password_only)
    assert PASSWORD not in raised.value.one_line()


# --- failures, retries, redaction ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "status", "kind"),
    [
        ("unauthorized: authentication required", 500, "auth"),
        ("no basic auth credentials", 500, "auth"),
        ("denied: requested access to the resource is denied", None, "auth"),
        ('Get "http://127.0.0.1:5/v2/": dial tcp 127.0.0.1:5: connect: connection refused',
         500, "transient"),
        ("read tcp 127.0.0.1:1->127.0.0.1:2: read: connection reset by peer", None, "transient"),
        ("net/http: request canceled (Client.Timeout exceeded)", None, "transient"),
        ('Get "http://127.0.0.1:5/v2/": context deadline exceeded', 500, "transient"),
        ("context deadline exceeded", None, "transient"),
        ("net/http: TLS handshake timeout", None, "transient"),
        ("dial tcp 127.0.0.1:5: i/o timeout", None, "transient"),
        ("received unexpected HTTP status: 503 Service Unavailable", None, "transient"),
        ("Internal Server Error", 500, "transient"),
        ("manifest unknown: manifest unknown", 404, "missing"),
        ("invalid reference format", 400, "other"),
    ],
)
def test_failures_are_sorted_by_what_the_engine_says(
    text: str, status: int | None, kind: str
) -> None:
    assert classify(text, status) == kind


def test_transient_failures_back_off_then_give_up() -> None:
    credentials = Credentials("127.0.0.1:5", "alice", PASSWORD)
    slept: list[float] = []
    lines: list[str] = []
    calls = 0

    def refused(_: float | None) -> str:
        nonlocal calls
        calls += 1
        raise DockerOperationError(
            f"push x failed: Get http://alice:{PASSWORD}@127.0.0.1:5/v2/: connection refused"
        )

    with pytest.raises(RegistryUnavailable) as raised:
        with_retries(refused, action="push", reference="x", credentials=credentials,
                     attempts=4, log=lines.append, sleep=slept.append)
    assert calls == 4
    assert slept == [1, 2, 4]
    assert raised.value.attempts == 4
    assert re.search(r"failed after 4 attempts in \d+ s: ", raised.value.message)
    shown = " ".join([*lines, raised.value.one_line(), str(raised.value), repr(raised.value)])
    assert PASSWORD not in shown
    assert f"alice:{MASK}@" in shown
    assert [re.findall(r"attempt \d/4 failed", line) for line in lines] == [
        ["attempt 1/4 failed"], ["attempt 2/4 failed"], ["attempt 3/4 failed"]
    ]


def test_a_transient_failure_then_success_returns_the_attempts() -> None:
    answers = iter([DockerOperationError("x: received unexpected HTTP status: 502 Bad Gateway")])

    def flaky(_: float | None) -> str:
        for error in answers:
            raise error
        return "sha256:ok"

    result = with_retries(flaky, action="push", reference="x", credentials=Credentials("r"),
                          attempts=3, log=quiet, sleep=lambda _: None)
    assert result == ("sha256:ok", 2)


def test_auth_failures_and_missing_tags_are_not_retried() -> None:
    credentials = Credentials("r.example", "alice", PASSWORD)
    slept: list[float] = []

    def refused(_: float | None) -> str:
        raise DockerOperationError("pull r failed: unauthorized: authentication required")

    with pytest.raises(RegistryAuthError) as raised:
        with_retries(refused, action="pull", reference="r", credentials=credentials,
                     attempts=5, log=quiet, sleep=slept.append)
    assert slept == []
    assert raised.value.one_line().startswith(
        "authentication failed for r.example (user alice) on pull r: unauthorized"
    )
    assert "LAYERKEEP_REGISTRY_PASSWORD" in raised.value.hint

    def missing(_: float | None) -> str:
        raise DockerOperationError("pull r failed: manifest unknown")

    with pytest.raises(TagNotFound):
        with_retries(missing, action="pull", reference="r", credentials=credentials,
                     attempts=5, log=quiet, sleep=slept.append)
    assert slept == []


def test_credentials_never_show_the_password() -> None:
    credentials = Credentials("r.example", "alice", PASSWORD)
    assert PASSWORD not in repr(credentials)
    encoded = "cGE1NS13MHJkL3dpdGg6b2RkQGNoYXJz"  # what URL-quoting would not catch
    shown = credentials.redact(f"x {PASSWORD} y pa55-w0rd%2Fwith%3Aodd%40chars")
    assert shown == f"x {MASK} y {MASK}"
    assert PASSWORD not in credentials.redact(encoded + PASSWORD)
    assert Credentials("r").auth_config() is None  # docker-py then uses ~/.docker/config.json


# --- a real registry ---------------------------------------------------------------------


def tiny_image(engine: Engine, repository: str) -> str:
    """A one-file image made on the spot: unique content, so a unique digest."""
    content = uuid.uuid4().hex.encode()
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as archive:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(content)
        archive.addfile(info, io.BytesIO(content))
    engine.api.import_image_from_data(data.getvalue(), repository=repository, tag="latest")
    return f"{repository}:latest"


def catalog(registry: Registry) -> list[str]:
    status, data, _ = registry.get("/v2/_catalog")
    assert status == 200
    return list(data["repositories"])


def local_tags(engine: Engine, prefix: str) -> list[str]:
    """Local names starting with ``prefix``: tags, and the digests pushes and pulls record."""
    return [
        name for image in engine.api.images()
        for name in [*(image.get("RepoTags") or []), *(image.get("RepoDigests") or [])]
        if name.startswith(prefix)
    ]


def run_task(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # release.push alone: its graph prerequisites (git.touch ... test.run) need a project.
    return subprocess.run(
        [*INV, *args], cwd=project, capture_output=True, text=True, check=False,
        env=clean_environ(LAYERKEEP_SKIP_DEPENDENCIES="yes", **env), timeout=300,
    )


def task_lines(stdout: str, task: str) -> list[str]:
    """What ``task`` printed: the lines after its ``==> task`` header, up to the summary."""
    lines = stdout.splitlines()
    start = lines.index(f"==> {task}") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def task_project(folder: Path, image: str, registry: str, **extra: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tasks.py").write_text(TASKS_PY)
    values = {"IMAGE": image, "REGISTRY": registry, "COMMIT": COMMIT, "BRANCH": "main", **extra}
    (folder / ".env").write_text("".join(f"LAYERKEEP_{k}={v}\n" for k, v in values.items()))
    return folder


@contextlib.contextmanager
def removing(engine: Engine, prefix: str) -> Iterator[None]:
    """Remove every local tag starting with ``prefix`` afterwards (a failed run's too)."""
    try:
        yield
    finally:
        for name in local_tags(engine, prefix):
            # False when gone already, with a name removed before it.
            engine.remove_image(name, force=True)


@docker
@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "htpasswd"])
def test_every_tag_resolves_to_the_pushed_digest(
    engine: Engine, unique_repository: str, tmp_path: Path, auth: bool
) -> None:
    user, password = ("alice", PASSWORD) if auth else ("", "")
    source = tiny_image(engine, f"{unique_repository}/app")
    with running_registry(tmp_path / "registry", user=user, password=password) as registry:
        settings = settings_for(
            tmp_path, image=f"{unique_repository}/app", registry=registry.address,
            commit=COMMIT, branch="feature/Login_2", release_latest_branch="feature/Login_2",
            release_tags="stable", registry_user=user, registry_password=password,
        )
        lines: list[str] = []
        with removing(engine, registry.address):
            report = push_release(engine, settings, log=lines.append)

        path = f"{unique_repository}/app"
        assert catalog(registry) == [path]
        expected = [COMMIT, f"feature-login_2-{hashed('feature/Login_2')}", "latest", "stable"]
        status, listing, _ = registry.get(f"/v2/{path}/tags/list")
        assert status == 200
        assert sorted(listing["tags"]) == sorted(expected)
        assert report.digest.startswith("sha256:")
        for tag in expected:
            assert registry.digest_of(path, tag) == report.digest
        assert [pushed.verified for pushed in report.pushed] == [True] * 4
        assert [pushed.attempts for pushed in report.pushed] == [1] * 4
        assert report.push_seconds > 0
        assert report.verify_seconds > 0
        # The tags made for the push are gone; the app image is untouched.
        assert local_tags(engine, registry.address) == []
        assert engine.image_id(source) is not None
        who = "user alice" if auth else "no user set: docker login"
        assert lines[0] == (
            f"release: {source} -> {registry.address}/{path} ({who}) as {', '.join(expected)}"
        )
        assert lines[-1].startswith(f"released {source} to {registry.address}: 4 tag(s) at ")
        assert PASSWORD not in "\n".join(lines)


@docker
def test_wrong_password_fails_in_one_line_without_the_password(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    tiny_image(engine, f"{unique_repository}/app")
    with running_registry(tmp_path / "registry", user="alice", password=PASSWORD) as registry:
        project = task_project(tmp_path / "project", f"{unique_repository}/app", registry.address)
        with removing(engine, registry.address):
            done = run_task(
                project, "release.push",
                LAYERKEEP_REGISTRY_USER="alice", LAYERKEEP_REGISTRY_PASSWORD="not-" + PASSWORD,
            )
            assert done.returncode == 1, done.stdout + done.stderr
            errors = done.stderr.strip().splitlines()
            assert len(errors) == 1, done.stderr
            assert errors[0].startswith(
                f"layerkeep: release.push: authentication failed for {registry.address} "
                "(user alice) on push "
            )
            assert "check LAYERKEEP_REGISTRY_USER and LAYERKEEP_REGISTRY_PASSWORD" in errors[0]
            assert PASSWORD not in done.stdout + done.stderr
            assert "attempt" not in done.stdout + done.stderr  # not retried

            # No user at all: the engine's docker login is used, and the hint says so.
            anonymous = run_task(project, "release.push")
            assert anonymous.returncode == 1
            assert (
                f"authentication failed for {registry.address} (no user set: docker login)"
                in anonymous.stderr
            )
            assert f"run `docker login {registry.address}`" in anonymous.stderr

            settings = settings_for(
                project, image=f"{unique_repository}/app", registry=registry.address,
                commit=COMMIT, branch="main", registry_user="alice",
                registry_password="wrong-" + PASSWORD,
            )
            with pytest.raises(RegistryAuthError) as raised:
                push_release(engine, settings, log=quiet)
        error = raised.value
        shown = [error.one_line(), str(error), repr(error), *map(str, error.args)]
        assert all(PASSWORD not in text for text in shown)
        assert catalog(registry) == []


@docker
def test_stopped_registry_is_retried_then_reported(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    tiny_image(engine, f"{unique_repository}/app")
    with running_registry(tmp_path / "registry") as registry:
        registry.stop()
        project = task_project(
            tmp_path / "project", f"{unique_repository}/app", registry.address,
            PUSH_RETRIES="3",
        )
        started = time.monotonic()
        with removing(engine, registry.address):
            done = run_task(project, "release.push")
        took = time.monotonic() - started

    assert done.returncode == 1
    retries = re.findall(
        r"attempt (\d)/3 failed after \d+ s \(.*connection refused\); retrying in (\d) s",
        done.stdout,
    )
    assert retries == [("1", "1"), ("2", "2")]
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1
    assert re.search(r"failed after 3 attempts in \d+ s: ", errors[0])
    assert "connection refused" in errors[0]
    assert f"is {registry.address} up and reachable" in errors[0]
    assert took >= 3  # 1 s + 2 s of backoff


@docker
def test_registry_back_during_backoff_gets_the_push(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    source = tiny_image(engine, f"{unique_repository}/app")
    with contextlib.ExitStack() as stack:
        registry = stack.enter_context(running_registry(tmp_path / "registry"))
        registry.stop()
        address = registry.address
        restarted: list[Registry] = []

        def restart(_: float) -> None:
            # The first backoff is when the registry comes back, on the same port.
            if not restarted:
                port = int(address.rsplit(":", 1)[1])
                restarted.append(stack.enter_context(
                    running_registry(tmp_path / "registry", port=port)
                ))

        settings = settings_for(
            tmp_path, image=f"{unique_repository}/app", registry=address, commit=COMMIT,
            branch="main", push_retries="3",
        )
        lines: list[str] = []
        with removing(engine, address):
            report = push_release(engine, settings, log=lines.append, sleep=restart)
        assert [pushed.attempts for pushed in report.pushed] == [2, 1]
        assert restarted[0].digest_of(f"{unique_repository}/app", "main") == report.digest
        assert any("attempt 1/3 failed" in line for line in lines)
        assert engine.image_id(source) is not None


@docker
def test_dry_run_prints_the_plan_and_changes_nothing(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    tiny_image(engine, f"{unique_repository}/app")
    with running_registry(tmp_path / "registry") as registry:
        project = task_project(
            tmp_path / "project", f"{unique_repository}/app", registry.address,
            RELEASE_LATEST_BRANCH="main",
        )
        with removing(engine, registry.address):
            done = run_task(project, "release.push", "--dry-run")
            tags_after = local_tags(engine, registry.address)
        assert done.returncode == 0, done.stderr
        assert catalog(registry) == []
    assert tags_after == []
    lines = task_lines(done.stdout, "release.push")
    assert lines[0] == (
        f"release: {unique_repository}/app:latest -> {registry.address}/{unique_repository}/app "
        f"(no user set: docker login) as {COMMIT}, main, latest"
    )
    assert lines[1].startswith("dry run: would push 3 tag(s) of sha256:")
    assert lines[1].endswith("; nothing changed")


@docker
def test_branch_filter_and_empty_registry_push_nothing(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    tiny_image(engine, f"{unique_repository}/app")
    with running_registry(tmp_path / "registry") as registry:
        project = task_project(
            tmp_path / "project", f"{unique_repository}/app", registry.address,
            BRANCH="feature/x", RELEASE_BRANCHES="main,release/*",
        )
        done = run_task(project, "release.push")
        assert done.returncode == 0, done.stderr
        assert catalog(registry) == []
        assert "branch 'feature/x' matches none of LAYERKEEP_RELEASE_BRANCHES" in done.stdout

        with removing(engine, registry.address):
            matching = run_task(project, "release.push", LAYERKEEP_BRANCH="release/1.2")
        assert matching.returncode == 0, matching.stderr
        assert catalog(registry) == [f"{unique_repository}/app"]

    empty = task_project(tmp_path / "empty", f"{unique_repository}/app", "")
    done = run_task(empty, "release.push")
    assert done.returncode == 0, done.stderr
    # The task layer skips release.push itself, and says why in its summary.
    assert re.search(r"^release\.push +skipped .*no LAYERKEEP_REGISTRY$", done.stdout, re.M)


@docker
def test_missing_app_image_is_one_clear_error(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    settings = settings_for(
        tmp_path, image=f"{unique_repository}/never-built", registry="127.0.0.1:9",
        commit=COMMIT, branch="main",
    )
    with pytest.raises(DockerOperationError) as raised:
        push_release(engine, settings, log=quiet)
    assert raised.value.one_line() == (
        f"the app image {unique_repository}/never-built:latest is not in the engine "
        "(build it first with `inv image.build`)"
    )
