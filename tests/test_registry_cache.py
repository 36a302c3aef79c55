"""LAYERKEEP_CACHE_BACKEND=registry: a cache pulled from a real registry is really used.

Each docker test builds a small multi-stage project on a base image of its own (so no
other run's build cache can match it), saves it to a real registry, and loads and
rebuilds on a private engine that never built anything (another machine), with the
classic builder and with BuildKit; branch scopes are checked through the registry's API.
"""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SESSION_LABEL, TEST_LABEL
from registry_setup import Registry, running_registry
from sample_project import build, make_project
from second_engine import SecondEngineUnavailable, second_engine

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.builder import Builder
from layerkeep.cache.backend import save_cache
from layerkeep.cache.registry_backend import (
    cache_location,
    cache_scope,
    cache_tags,
    load_from_registry,
    save_to_registry,
    scope_name,
    scoped_tag,
)
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, connect
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import is_valid_tag
from layerkeep.core.registry_failures import RegistryAuthError
from layerkeep.core.settings import Settings, load_settings

docker = pytest.mark.docker  # the scheme tests need no engine
PASSWORD = "cache-s3cret"  # noqa: S105 - the test registry's


def with_registry(
    settings: Settings, registry: Registry, environ: Mapping[str, str] | None = None,
    **extra: str,
) -> Settings:
    """The project's settings with the registry backend pointed at ``registry``; ``environ``
    adds variables (a CI's), ``extra`` LAYERKEEP_ keys (``branch="main"``)."""
    full = {
        **(environ or {}),
        "LAYERKEEP_CACHE_BACKEND": "registry",
        "LAYERKEEP_REGISTRY": registry.address,
        "LAYERKEEP_REGISTRY_USER": registry.user,
        "LAYERKEEP_REGISTRY_PASSWORD": registry.password,
        **{f"LAYERKEEP_{key.upper()}": value for key, value in extra.items()},
    }
    return load_settings(settings.project_dir, full, git_facts=lambda _: GitFacts("", ""))


def local_tags(engine: Engine, prefix: str) -> list[str]:
    """Local names starting with ``prefix``: tags, and the digests pushes and pulls record."""
    return [
        name for image in engine.api.images()
        for name in [*(image.get("RepoTags") or []), *(image.get("RepoDigests") or [])]
        if name.startswith(prefix)
    ]


def remove(engine: Engine, names: list[str]) -> None:
    for name in names:
        # False when gone already, with a name removed before it.
        engine.remove_image(name, force=True)


def quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Fresh:
    """A private engine standing for another machine, and the environment reaching it."""

    engine: Engine
    environ: dict[str, str]

    def empty(self) -> None:
        """No image and no build cache at all: a machine that never built anything."""
        # Images first, so that removing each also removes its parents.
        for image in self.engine.api.images():
            self.engine.remove_image(str(image["Id"]), force=True)
        self.engine.api.prune_builds(all=True)  # a private engine: all of it is ours
        assert self.engine.api.images(all=True) == []
        assert self.engine.build_cache_entries() == 0


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fresh]:
    """A private Docker 20.10 engine for this module, emptied by each test that uses it."""
    try:
        with second_engine(tmp_path_factory.mktemp("fresh-engine")) as second:
            connected = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            try:
                yield Fresh(connected, dict(second.environ))
            finally:
                connected.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))


def tags_in(registry: Registry, repository: str) -> dict[str, str]:
    """Every tag of ``repository`` and its manifest digest, through the registry's HTTP API."""
    path = repository.removeprefix(f"{registry.address}/")
    status, listing, _ = registry.get(f"/v2/{path}/tags/list")
    if status == 404:
        return {}
    assert status == 200
    found = {tag: registry.digest_of(path, tag) for tag in listing["tags"] or []}
    return {tag: digest for tag, digest in found.items() if digest}


# --- the tag scheme ------------------------------------------------------------------


def test_cache_tags_follow_the_local_names(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM base AS deps\nRUN true\nFROM base AS builder\nRUN true\nFROM base\nRUN true\n"
    )
    (tmp_path / ".env").write_text(
        "LAYERKEEP_IMAGE=myorg/app:dev\nLAYERKEEP_REGISTRY=ghcr.io\n"
        "LAYERKEEP_CACHE_IMAGES=postgres:15,127.0.0.1:5000/some/very_long:Tag_X\n"
    )
    settings = load_settings(tmp_path, {}, git_facts=lambda _: GitFacts("", ""))
    assert cache_location(settings).repository == "ghcr.io/myorg/app-cache"
    tags = cache_tags(settings, images_to_cache(settings))
    assert list(tags.items())[:3] == [
        ("myorg/app:dev-stage-deps", "dev-stage-deps"),
        ("myorg/app:dev-stage-builder", "dev-stage-builder"),
        ("myorg/app:dev", "dev"),
    ]
    assert tags["postgres:15"].startswith("extra-postgres-15-")
    extra = tags["127.0.0.1:5000/some/very_long:Tag_X"]
    assert extra.startswith("extra-127.0.0.1-5000-some-very_long-tag_x-")
    assert all(is_valid_tag(tag) for tag in tags.values())
    assert len(set(tags.values())) == len(tags)


def test_cache_location_comes_from_the_settings(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LAYERKEEP_IMAGE=ghcr.io/org/app\n")

    def load(**values: str) -> Settings:
        environ = {f"LAYERKEEP_{k.upper()}": v for k, v in values.items()}
        return load_settings(tmp_path, environ, git_facts=lambda _: GitFacts("", ""))

    assert cache_location(load(registry="127.0.0.1:5000")).repository == (
        "127.0.0.1:5000/org/app-cache"
    )
    own = cache_location(
        load(registry="127.0.0.1:5000", cache_repository="cache.example/team/app-cache",
             registry_user="alice", registry_password=PASSWORD)
    )
    assert own.repository == "cache.example/team/app-cache"
    # The credentials belong to LAYERKEEP_REGISTRY: another host never gets them.
    assert own.credentials.auth_config() is None
    same = cache_location(
        load(registry="cache.example", cache_repository="cache.example/team/app-cache",
             registry_user="alice", registry_password=PASSWORD)
    )
    assert same.credentials.auth_config() == {
        "username": "alice", "password": PASSWORD, "serveraddress": "cache.example"
    }
    with pytest.raises(ConfigError, match="needs LAYERKEEP_REGISTRY or LAYERKEEP_CACHE_REP"):
        cache_location(load())
    with pytest.raises(ConfigError, match="is not a repository"):
        cache_location(load(cache_repository="cache.example/app:tag"))


def test_branch_scopes_never_share_a_tag() -> None:
    assert scope_name("main") == "main"
    assert scope_name("Release-2.1") == "Release-2.1"
    hashed = ["feature/login", "a--b", "ends-with-", "latest", "x" * 49, "", "ünï"]
    for branch in hashed:
        scope = scope_name(branch)
        assert re.fullmatch(r"[a-z0-9._-]*[a-z0-9._]-[0-9a-f]{10}", scope), scope
        assert "--" not in scope
        assert len(scope) <= 48
    # "--" ends the scope, so a branch and a tag can never make another pair's tag.
    pairs = [("a", "b--c"), ("a--b", "c"), ("a-", "-b"), ("a", "--b"), ("main", "latest"),
             ("main-", "latest"), ("feature/a", "latest"), ("feature-a", "latest")]
    tags = [scoped_tag(scope_name(branch), tag) for branch, tag in pairs]
    assert len(set(tags)) == len(tags)
    long = scoped_tag(scope_name("b" * 48), "t" * 128)
    assert len(long) == 128
    assert is_valid_tag(long)
    assert long != scoped_tag(scope_name("b" * 48), "t" * 127)


def load(tmp_path: Path, environ: Mapping[str, str], **values: str) -> Settings:
    (tmp_path / ".env").write_text("LAYERKEEP_IMAGE=org/app\n")
    full = {**environ, **{f"LAYERKEEP_{k.upper()}": v for k, v in values.items()}}
    return load_settings(tmp_path, full, git_facts=lambda _: GitFacts("", "main"))


GITHUB_PR = {"GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": "pull_request",
             "GITHUB_HEAD_REF": "fix", "GITHUB_REF_NAME": "7/merge", "GITHUB_BASE_REF": "dev"}
GITLAB_MR = {"GITLAB_CI": "true", "CI_COMMIT_REF_NAME": "fix", "CI_MERGE_REQUEST_IID": "4",
             "CI_MERGE_REQUEST_TARGET_BRANCH_NAME": "dev", "CI_DEFAULT_BRANCH": "trunk"}


def test_fallback_branch_and_pull_requests_come_from_the_ci(tmp_path: Path) -> None:
    def facts(settings: Settings) -> tuple[str, str, bool]:
        return settings.branch, settings.cache_fallback_branch, settings.pull_request

    assert facts(load(tmp_path, {})) == ("main", "main", False)
    assert facts(load(tmp_path, GITHUB_PR)) == ("fix", "dev", True)
    # A push run: no GITHUB_BASE_REF, and no variable names the default branch.
    assert facts(load(tmp_path, {"GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": "push",
                                 "GITHUB_REF_NAME": "fix"})) == ("fix", "main", False)
    assert facts(load(tmp_path, GITLAB_MR)) == ("fix", "dev", True)
    assert facts(load(tmp_path, {"GITLAB_CI": "true", "CI_COMMIT_REF_NAME": "fix",
                                 "CI_DEFAULT_BRANCH": "trunk"})) == ("fix", "trunk", False)
    assert facts(load(tmp_path, {"CIRCLECI": "true", "CIRCLE_BRANCH": "fix",
                                 "CIRCLE_PULL_REQUEST": "https://github.com/o/r/pull/7"})) == (
        "fix", "main", True
    )
    # The settings win over the CI, "no" included.
    assert facts(load(tmp_path, GITHUB_PR, pull_request="no", cache_fallback_branch="stable")) == (
        "fix", "stable", False
    )
    settings = load(tmp_path, GITHUB_PR)
    assert settings.origins["LAYERKEEP_PULL_REQUEST"] == "default (CI variables)"
    with pytest.raises(ConfigError, match="LAYERKEEP_CACHE_READ_ONLY='sometimes'"):
        load(tmp_path, {}, cache_read_only="sometimes")


def test_which_builds_may_write_the_cache(tmp_path: Path) -> None:
    pull = cache_scope(load(tmp_path, GITHUB_PR))
    assert (pull.own, pull.fallback, pull.read_only) == ("fix", "dev", "")
    assert pull.sources("latest") == ("fix--latest", "dev--latest")
    assert pull.tag("latest") == "fix--latest"
    auto = cache_scope(load(tmp_path, GITHUB_PR, cache_read_only="auto"))
    assert auto.read_only == "a pull request build (LAYERKEEP_CACHE_READ_ONLY=auto)"
    assert cache_scope(load(tmp_path, {}, cache_read_only="auto")).read_only == ""
    assert cache_scope(load(tmp_path, {}, cache_read_only="yes")).read_only == (
        "LAYERKEEP_CACHE_READ_ONLY=yes"
    )
    # A fork's "dev" opened against "dev": it would write the default scope, so it never does.
    fork = cache_scope(load(tmp_path, {**GITHUB_PR, "GITHUB_HEAD_REF": "dev"}))
    assert fork.read_only.startswith("a pull request from a branch named 'dev', like the fallback")
    assert fork.sources("latest") == ("dev--latest",)
    # No branch known: the fallback branch's scope, and saves go there.
    detached = load_settings(tmp_path, {"LAYERKEEP_CACHE_FALLBACK_BRANCH": "trunk"},
                             git_facts=lambda _: GitFacts("", ""))
    assert detached.branch == ""
    unknown = cache_scope(detached)
    assert (unknown.own, unknown.fallback, unknown.read_only) == ("trunk", "trunk", "")


# --- a real registry -----------------------------------------------------------------


@docker
@pytest.mark.parametrize("kind", ["legacy", "buildkit"])
def test_cache_pulled_from_the_registry_reuses_every_step(
    engine: Engine, fresh: Fresh, unique_repository: str, tmp_path: Path, kind: str
) -> None:
    project = make_project(tmp_path / "project", unique_repository, engine, unique_base=True)
    with running_registry(tmp_path / "registry", user="alice", password=PASSWORD) as registry:
        settings = with_registry(project, registry)
        repository = cache_location(settings).repository
        try:
            lines: list[str] = []
            first = load_from_registry(
                engine, settings, images_to_cache(settings), log=lines.append,
            )
            assert first.cold
            assert sorted(first.missing) == sorted(images_to_cache(settings))
            assert lines == [f"no cache in {repository} (scope main) yet: this is a cold build"]
            # Where the app's cache is BuildKit's own (no images asked for): not "cold".
            load_from_registry(engine, settings, [], log=lines.append)
            assert len(lines) == 1

            # The base is new: nothing any run left on this shared engine can match.
            cold = build(engine, settings, kind)
            assert cold.tally.reused == 0
            saved = save_to_registry(
                engine, settings, images_to_cache(settings), environ=os.environ, log=quiet,
            )
            assert sorted(saved.saved) == sorted(images_to_cache(settings))
            assert saved.layers_written >= 3
            tags = cache_tags(settings, images_to_cache(settings))
            assert sorted(tags_in(registry, repository)) == sorted(
                f"main--{tag}" for tag in tags.values()
            )

            again = save_to_registry(
                engine, settings, images_to_cache(settings), environ=os.environ, log=quiet,
            )
            assert again.skipped
            assert sorted(again.unchanged) == sorted(images_to_cache(settings))

            # Another machine that never built anything, not even the project's base.
            fresh.empty()
            lines.clear()
            loaded = load_from_registry(
                fresh.engine, settings, images_to_cache(settings), log=lines.append,
            )
            assert sorted(loaded.restored) == sorted(images_to_cache(settings))
            assert loaded.missing == []
            assert loaded.from_fallback == []
            assert not loaded.cold
            assert loaded.bytes_read > 3_000_000  # the deps stage's 3 MB of random bytes
            assert lines[-1].startswith(f"restored 3 image(s) from {repository} (scope main; ")
            app = str(settings.require_image())
            # A pulled image has no parent chain; the classic builder does not need one.
            attrs = fresh.engine.image_attrs(app)
            assert attrs is not None
            assert attrs["Parent"] == ""

            warm = build(fresh.engine, settings, kind, fresh.environ)
            assert (warm.tally.reused, warm.tally.total) == (cold.tally.total, cold.tally.total)
            assert len(warm.cache_from) == 2
            output = fresh.engine.client.containers.run(app, remove=True)
            assert output == b"hello\n"
        finally:
            remove(engine, local_tags(engine, f"{registry.address}/"))


@docker
def test_a_new_branch_starts_from_the_default_branch_and_never_writes_its_tags(
    engine: Engine, fresh: Fresh, unique_repository: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", unique_repository, engine, unique_base=True)
    with running_registry(tmp_path / "registry") as registry:
        main = with_registry(project, registry, branch="main")
        branch = with_registry(project, registry, branch="feature/login")
        repository = cache_location(main).repository
        images = images_to_cache(main)
        try:
            cold = build(engine, main, "buildkit")
            assert cold.tally.reused == 0
            save_to_registry(engine, main, images, environ=os.environ, log=quiet)
            mains = tags_in(registry, repository)
            assert len(mains) == 3
            assert all(tag.startswith("main--") for tag in mains)

            # The branch's first build, on a machine that never built anything.
            fresh.empty()
            lines: list[str] = []
            loaded = load_from_registry(
                fresh.engine, branch, images_to_cache(branch), log=lines.append,
            )
            assert sorted(loaded.restored) == sorted(loaded.from_fallback) == sorted(images)
            scope = cache_scope(branch).own
            assert scope.startswith("feature-login-")
            assert lines[-1].startswith(
                f"restored 3 image(s) from {repository} (scope {scope}, else main, 3 of them "
                "from main's scope; "
            )
            first = build(fresh.engine, branch, "buildkit", fresh.environ)
            assert first.tally.reused == first.tally.total == cold.tally.total
            print(
                f"\nfirst build on a new branch: {first.tally.reused}/{first.tally.total} steps "
                f"reused; load from main's scope {loaded.seconds:.1f} s "
                f"({loaded.bytes_read / 1e6:.1f} MB)"
            )

            # The branch changes its code and saves: under its own scope only.
            (project.project_dir / "src" / "main.txt").write_text("branch\n")
            build(fresh.engine, branch, "buildkit", fresh.environ)
            saved = save_to_registry(fresh.engine, branch, images, environ=os.environ, log=quiet)
            assert sorted(saved.saved) == sorted(images)
            after = tags_in(registry, repository)
            assert {tag: after[tag] for tag in mains} == mains
            branch_tags = {tag: digest for tag, digest in after.items() if tag not in mains}
            assert sorted(branch_tags) == sorted(f"{scope}--{tag.removeprefix('main--')}"
                                                 for tag in mains)
            app = cache_tags(main, images)[str(main.require_image())]
            assert branch_tags[f"{scope}--{app}"] != mains[f"main--{app}"]

            # The default branch still loads its own images, not the branch's.
            fresh.empty()
            again = load_from_registry(fresh.engine, main, images_to_cache(main), log=quiet)
            assert again.from_fallback == []
            assert fresh.engine.image_id(str(main.require_image())) == engine.image_id(
                str(main.require_image())
            )
        finally:
            remove(engine, local_tags(engine, f"{registry.address}/"))


@docker
def test_a_pull_request_set_read_only_pushes_nothing(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", unique_repository, engine, unique_base=True)
    github_pull_request = {
        "GITHUB_ACTIONS": "true", "GITHUB_EVENT_NAME": "pull_request",
        "GITHUB_HEAD_REF": "fix-typo", "GITHUB_BASE_REF": "develop",
    }
    with running_registry(tmp_path / "registry") as registry:
        develop = with_registry(project, registry, branch="develop")
        pull = with_registry(project, registry, github_pull_request, cache_read_only="auto")
        assert (pull.branch, pull.cache_fallback_branch, pull.pull_request) == (
            "fix-typo", "develop", True
        )
        repository = cache_location(pull).repository
        images = images_to_cache(pull)
        try:
            build(engine, develop, "legacy")
            save_to_registry(engine, develop, images, environ=os.environ, log=quiet)
            before = tags_in(registry, repository)
            assert len(before) == 3

            loaded = load_from_registry(engine, pull, images_to_cache(pull), log=quiet)
            assert sorted(loaded.present) == sorted(loaded.from_fallback) == sorted(images)
            (project.project_dir / "src" / "main.txt").write_text("pull request\n")
            assert build(engine, pull, "legacy").tally.reused > 0
            lines: list[str] = []
            # The whole save, as cache.save runs it: images, build records, cache mounts.
            report = save_cache(
                engine, pull, Builder("legacy"), os.environ, log=lines.append
            ).images

            assert report.saved == report.unchanged == []
            assert (
                f"registry cache {repository} is read-only here (a pull request build "
                "(LAYERKEEP_CACHE_READ_ONLY=auto)): nothing pushed"
            ) in lines
            assert tags_in(registry, repository) == before
            assert local_tags(engine, f"{repository}:fix-typo--") == []
        finally:
            remove(engine, local_tags(engine, f"{registry.address}/"))


@docker
def test_changed_image_is_pushed_and_unchanged_ones_are_skipped(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", unique_repository, engine)
    with running_registry(tmp_path / "registry") as registry:
        settings = with_registry(project, registry)
        repository = cache_location(settings).repository
        try:
            build(engine, settings, "legacy")
            save_to_registry(
                engine, settings, images_to_cache(settings), environ=os.environ, log=quiet,
            )
            path = repository.removeprefix(f"{registry.address}/")
            before = registry.digest_of(path, "main--latest")
            (settings.project_dir / "src" / "main.txt").write_text("v2\n")
            build(engine, settings, "legacy")

            report = save_to_registry(
                engine, settings, images_to_cache(settings), environ=os.environ, log=quiet,
            )

            app = str(settings.require_image())
            assert report.saved == [app]
            assert sorted(report.unchanged) == sorted(set(images_to_cache(settings)) - {app})
            assert report.layers_written == 2  # COPY src and the RUN after it
            after = registry.digest_of(path, "main--latest")
            assert after not in (None, before)
        finally:
            remove(engine, local_tags(engine, f"{registry.address}/"))


@docker
def test_unreachable_registry_or_refused_login_is_a_warning_on_load(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", unique_repository, engine)
    with running_registry(tmp_path / "registry", user="alice", password=PASSWORD) as registry:
        wrong = with_registry(project, registry, registry_password="not-" + PASSWORD,
                              push_retries="1")
        lines: list[str] = []
        refused = load_from_registry(engine, wrong, images_to_cache(wrong), log=lines.append)
        assert refused.unreachable
        assert refused.cold
        assert len(lines) == 1
        assert lines[0].startswith(
            "warning: registry cache not used, building without it: authentication failed "
            f"for {registry.address} (user alice)"
        )
        # Saving with refused credentials is an error: the cache would silently go stale.
        build(engine, wrong, "legacy")
        try:
            with pytest.raises(RegistryAuthError):
                save_to_registry(
                    engine, wrong, images_to_cache(wrong), environ=os.environ, log=quiet,
                )
        finally:
            remove(engine, local_tags(engine, f"{registry.address}/"))

        registry.stop()
        settings = with_registry(project, registry, push_retries="2")
        lines.clear()
        down = load_from_registry(engine, settings, images_to_cache(settings), log=lines.append)
    assert down.unreachable
    assert down.cold
    assert down.restored == []
    assert "attempt 1/2 failed" in lines[0]
    assert "connection refused" in lines[0]
    assert lines[-1].startswith("warning: registry cache not used, building without it: pull ")
    assert re.search(r"failed after 2 attempts in \d+ s: ", lines[-1])
    assert len(lines) == 2  # one image's retries, then it stops trying
    assert PASSWORD not in "\n".join(lines)
    # The local images are still there and the build goes on.
    assert build(engine, settings, "legacy").tally.reused > 0



class _Unavailable(http.server.BaseHTTPRequestHandler):
    """A registry behind a proxy that answers 503 to everything."""

    def do_GET(self) -> None:
        self.send_response(503)
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *_: object) -> None:
        pass


@docker
def test_registry_answering_503_is_retried_with_backoff_then_skipped(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path / "project", unique_repository, engine)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    address = f"127.0.0.1:{server.server_address[1]}"
    environ = {"LAYERKEEP_CACHE_BACKEND": "registry", "LAYERKEEP_REGISTRY": address,
               "LAYERKEEP_PUSH_RETRIES": "4"}
    settings = load_settings(project.project_dir, environ, git_facts=lambda _: GitFacts("", ""))
    slept: list[float] = []
    lines: list[str] = []
    try:
        report = load_from_registry(
            engine, settings, images_to_cache(settings), log=lines.append, sleep=slept.append,
        )
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
    assert slept == [1, 2, 4]
    assert report.unreachable
    assert "received unexpected HTTP status: 503 Service Unavailable" in lines[-1]
    assert re.search(r"failed after 4 attempts in \d+ s: ", lines[-1])
