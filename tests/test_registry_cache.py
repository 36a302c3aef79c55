"""LAYERKEEP_CACHE_BACKEND=registry: a cache pulled from a real registry is really used.

Each docker test builds a small multi-stage project, saves it to a real registry, wipes
every local image of the project and the builder's cache (a fresh machine), loads from
the registry and rebuilds, with the classic builder and with BuildKit.
"""

from __future__ import annotations

import http.server
import re
import threading
from pathlib import Path

import pytest
from registry_setup import Registry, running_registry
from sample_project import build, make_project

from layerkeep.build.image import images_to_cache
from layerkeep.cache.registry_backend import (
    cache_location,
    cache_tags,
    load_from_registry,
    save_to_registry,
)
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import is_valid_tag
from layerkeep.core.registry import RegistryAuthError
from layerkeep.core.settings import Settings, load_settings

docker = pytest.mark.docker  # the scheme tests need no engine
PASSWORD = "cache-s3cret"  # noqa: S105 - the test registry's


def with_registry(settings: Settings, registry: Registry, **extra: str) -> Settings:
    """The project's settings with the registry backend pointed at ``registry``."""
    environ = {
        "LAYERKEEP_CACHE_BACKEND": "registry",
        "LAYERKEEP_REGISTRY": registry.address,
        "LAYERKEEP_REGISTRY_USER": registry.user,
        "LAYERKEEP_REGISTRY_PASSWORD": registry.password,
        **{f"LAYERKEEP_{key.upper()}": value for key, value in extra.items()},
    }
    return load_settings(settings.project_dir, environ, git_facts=lambda _: GitFacts("", ""))


def local_tags(engine: Engine, prefix: str) -> list[str]:
    """Local names starting with ``prefix``: tags, and the digests pushes and pulls record."""
    return [
        name for image in engine.api.images()
        for name in [*(image.get("RepoTags") or []), *(image.get("RepoDigests") or [])]
        if name.startswith(prefix)
    ]


def wipe(engine: Engine, settings: Settings, cache_repository: str) -> None:
    """A fresh machine: none of the project's images, no cache tags, no builder cache."""
    remove(engine, [*images_to_cache(settings), *local_tags(engine, cache_repository)])
    engine.api.prune_builds(all=True)
    assert all(engine.image_id(image) is None for image in images_to_cache(settings))
    assert local_tags(engine, cache_repository) == []


def remove(engine: Engine, names: list[str]) -> None:
    for name in names:
        # False when gone already, with a name removed before it.
        engine.remove_image(name, force=True)


def quiet(_: str) -> None:
    pass


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


# --- a real registry -----------------------------------------------------------------


@docker
@pytest.mark.parametrize("kind", ["legacy", "buildkit"])
def test_cache_pulled_from_the_registry_reuses_every_step(
    engine: Engine, unique_repository: str, tmp_path: Path, kind: str
) -> None:
    project = make_project(tmp_path / "project", unique_repository, engine)
    with running_registry(tmp_path / "registry", user="alice", password=PASSWORD) as registry:
        settings = with_registry(project, registry)
        repository = cache_location(settings).repository
        try:
            lines: list[str] = []
            first = load_from_registry(engine, settings, log=lines.append)
            assert first.cold
            assert sorted(first.missing) == sorted(images_to_cache(settings))
            assert lines == [f"no cache in {repository} yet: this is a cold build"]

            cold = build(engine, settings, kind)
            assert cold.tally.reused == 0
            saved = save_to_registry(engine, settings, images_to_cache(settings), log=quiet)
            assert sorted(saved.saved) == sorted(images_to_cache(settings))
            assert saved.layers_written >= 3
            path = repository.removeprefix(f"{registry.address}/")
            tags = cache_tags(settings, images_to_cache(settings))
            status, listing, _ = registry.get(f"/v2/{path}/tags/list")
            assert status == 200
            assert sorted(listing["tags"]) == sorted(tags.values())
            assert "latest" in listing["tags"]
            assert "latest-stage-deps" in listing["tags"]

            again = save_to_registry(engine, settings, images_to_cache(settings), log=quiet)
            assert again.skipped
            assert sorted(again.unchanged) == sorted(images_to_cache(settings))

            # Without the registry, a fresh machine builds cold: nothing local is left over.
            wipe(engine, settings, repository)
            engine.tag_image("debian:bookworm-slim", f"{unique_repository}-base:1")
            assert build(engine, settings, kind).tally.reused == 0
            wipe(engine, settings, repository)

            lines.clear()
            loaded = load_from_registry(engine, settings, log=lines.append)
            assert sorted(loaded.restored) == sorted(images_to_cache(settings))
            assert loaded.missing == []
            assert not loaded.cold
            assert loaded.bytes_read > 3_000_000  # the deps stage's 3 MB of random bytes
            assert lines[-1].startswith(f"restored 3 image(s) from {repository} (")
            app = str(settings.require_image())
            # A pulled image has no parent chain; the classic builder does not need one.
            attrs = engine.image_attrs(app)
            assert attrs is not None
            assert attrs["Parent"] == ""

            warm = build(engine, settings, kind)
            assert (warm.tally.reused, warm.tally.total) == (cold.tally.total, cold.tally.total)
            assert len(warm.cache_from) == 2
            output = engine.client.containers.run(app, remove=True)
            assert output == b"hello\n"
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
            save_to_registry(engine, settings, images_to_cache(settings), log=quiet)
            before = registry.digest_of(repository.removeprefix(f"{registry.address}/"), "latest")
            (settings.project_dir / "src" / "main.txt").write_text("v2\n")
            build(engine, settings, "legacy")

            report = save_to_registry(engine, settings, images_to_cache(settings), log=quiet)

            app = str(settings.require_image())
            assert report.saved == [app]
            assert sorted(report.unchanged) == sorted(set(images_to_cache(settings)) - {app})
            assert report.layers_written == 2  # COPY src and the RUN after it
            after = registry.digest_of(repository.removeprefix(f"{registry.address}/"), "latest")
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
        refused = load_from_registry(engine, wrong, log=lines.append)
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
                save_to_registry(engine, wrong, images_to_cache(wrong), log=quiet)
        finally:
            remove(engine, local_tags(engine, f"{registry.address}/"))

        registry.stop()
        settings = with_registry(project, registry, push_retries="2")
        lines.clear()
        down = load_from_registry(engine, settings, log=lines.append)
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
        report = load_from_registry(engine, settings, log=lines.append, sleep=slept.append)
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
    assert slept == [1, 2, 4]
    assert report.unreachable
    assert "received unexpected HTTP status: 503 Service Unavailable" in lines[-1]
    assert re.search(r"failed after 4 attempts in \d+ s: ", lines[-1])
