"""cache.prune and cache.status on a real registry (Debian's docker-registry, deletes
enabled), its scopes written through the registry's API: no engine needed.

Each scope holds what a save writes (the app image, a stage, a build record, a
cache-mount image, BuildKit's cache) and its marker, back-dated to the scope's age.
Feature scopes hold the very manifests main's scope holds (a branch that changed
nothing saves the same images): deleting one by digest would take main's tags too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clean_env import clean_environ
from registry_setup import Registry, running_registry

from layerkeep.cache.prune import PruneRefused, PruneReport, choose, prune_registry
from layerkeep.cache.registry_backend import scope_name, scoped_tag
from layerkeep.cache.registry_scopes import read_scopes
from layerkeep.cache.scope_marker import mark_saved, marker_tag, read_marker, write_marker
from layerkeep.cache.status import registry_status, status_lines
from layerkeep.cache.whole_scope import load_whole_scope
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.registry_api import DOCKER_MANIFEST, RegistryClient
from layerkeep.core.registry_api_errors import DeleteDisabled
from layerkeep.core.registry_credentials import Credentials
from layerkeep.core.settings import Settings, load_settings

REPOSITORY = "team/app-cache"
DAY = 86400.0
CONTENTS = ("latest", "latest-stage-builder", "latest-build-record",
            "latest-mount-pip-0123456789", "buildcache")
NOW = time.time()


def quiet(_: str) -> None:
    pass


@dataclass
class Cache:
    """A registry holding a cache repository, and a client of it."""

    registry: Registry
    client: RegistryClient
    project: Path

    def settings(self, **extra: str) -> Settings:
        """Registry-backend settings for branch ``extra['branch']`` (default main)."""
        environ = {
            "LAYERKEEP_IMAGE": "team/app",
            "LAYERKEEP_CACHE_BACKEND": "registry",
            "LAYERKEEP_REGISTRY": self.registry.address,
            "LAYERKEEP_CACHE_FALLBACK_BRANCH": "main",
            "LAYERKEEP_BUILD_ID": "nightly-7",
            **{f"LAYERKEEP_{key.upper()}": value for key, value in extra.items()},
        }
        return load_settings(self.project, environ, git_facts=lambda _: GitFacts("", ""))

    def save(self, branch: str, *, age_days: float | None, note: str = "same") -> None:
        """A scope as a save leaves it, marked ``age_days`` ago (None: no marker)."""
        scope = scope_name(branch)
        for content in CONTENTS:
            image(self.client, scoped_tag(scope, content), f"{note}-{content}")
        if age_days is not None:
            write_marker(self.client, REPOSITORY, scope, state="saved", branch=branch,
                         build_id=f"build-{branch}", at=NOW - age_days * DAY)

    def tags(self) -> dict[str, str]:
        """Every tag of the cache repository and the digest it names."""
        found = {tag: self.client.manifest_digest(REPOSITORY, tag)
                 for tag in self.client.tags(REPOSITORY)}
        return {tag: digest for tag, digest in found.items() if digest}

    def scope_tags(self, branch: str) -> set[str]:
        prefix = scope_name(branch) + "--"
        return {tag for tag in self.tags() if tag.startswith(prefix)}


def image(client: RegistryClient, tag: str, note: str, created: str = "") -> str:
    """A small image manifest (a config, no layer) under ``tag``; its digest."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "created": created or "2026-01-01T00:00:00Z",
         "config": {"Labels": {"note": note}}, "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
         "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(config), "digest": client.upload_blob(REPOSITORY, config)},
         "layers": []}
    ).encode()
    return client.put_manifest(REPOSITORY, tag, manifest, DOCKER_MANIFEST)


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[Cache]:
    with running_registry(tmp_path / "registry") as registry, RegistryClient(
        Credentials(registry.address, "", ""), environ={}, timeout=10
    ) as client:
        yield Cache(registry, client, tmp_path)


def prune(
    cache: Cache, *, live: tuple[str, ...] | None = None, dry_run: bool = False,
    settings: Settings | None = None, deleted: Callable[[str], None] = quiet,
) -> PruneReport:
    return prune_registry(
        settings or cache.settings(), {}, older_than=14, live_branches=live,
        dry_run=dry_run, log=quiet, deleted=deleted,
    )


def test_prune_by_age_removes_exactly_the_old_scopes_and_keeps_the_fallback(
    cache: Cache,
) -> None:
    cache.save("main", age_days=60)  # the fallback: never pruned, however old
    cache.save("feature/old", age_days=30)
    cache.save("feature/fresh", age_days=2)
    cache.save("release-1.x", age_days=15)
    main_before = {t: d for t, d in cache.tags().items() if t.startswith("main--")}
    fresh_before = cache.scope_tags("feature/fresh")

    report = prune(cache)

    assert sorted(item.scope.name for item in report.removed) == sorted(
        [scope_name("feature/old"), "release-1.x"]
    )
    assert cache.scope_tags("feature/old") == set()
    assert cache.scope_tags("release-1.x") == set()
    # Same manifests as the pruned scopes, still there under main's tags.
    assert {t: d for t, d in cache.tags().items() if t.startswith("main--")} == main_before
    assert cache.scope_tags("feature/fresh") == fresh_before
    assert len(main_before) == len(CONTENTS) + 1


def test_prune_by_gone_branch_removes_exactly_those_scopes(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("feature/Login--x", age_days=1)  # a hashed scope name
    cache.save("feature/kept", age_days=1)
    cache.save("bugfix-9", age_days=1)
    kept_before = cache.scope_tags("feature/kept")

    report = prune(cache, live=("main", "feature/kept"))

    removed = sorted(item.scope.name for item in report.removed)
    assert removed == sorted([scope_name("feature/Login--x"), "bugfix-9"])
    reasons = {item.reason for item in report.removed}
    assert reasons == {"branch feature/Login--x is gone", "branch bugfix-9 is gone"}
    assert cache.scope_tags("feature/Login--x") == set()
    assert cache.scope_tags("bugfix-9") == set()
    assert cache.scope_tags("feature/kept") == kept_before
    assert len(cache.scope_tags("main")) == len(CONTENTS) + 1


def test_the_fallback_scope_stays_even_when_the_branch_list_lacks_it(cache: Cache) -> None:
    cache.save("main", age_days=90)
    prune(cache, live=("feature/x",))
    assert len(cache.scope_tags("main")) == len(CONTENTS) + 1


def test_a_dry_run_names_the_scopes_and_deletes_nothing(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("old", age_days=40)
    before = cache.tags()
    report = prune(cache, dry_run=True)
    assert [item.scope.name for item in report.removed] == ["old"]
    assert cache.tags() == before


def test_a_scope_without_marker_is_aged_by_its_images(cache: Cache) -> None:
    cache.save("main", age_days=1)
    for content in ("latest", "latest-stage-builder"):
        image(cache.client, f"legacy--{content}", content, created="2020-05-01T10:00:00.5Z")
        image(cache.client, f"recent--{content}", content,
              created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    report = prune(cache)
    assert [item.scope.name for item in report.removed] == ["legacy"]
    assert cache.scope_tags("legacy") == set()
    assert cache.scope_tags("recent") == {"recent--latest", "recent--latest-stage-builder"}


def test_a_read_only_job_refuses_to_delete(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("old", age_days=40)
    before = cache.tags()
    for settings in (
        cache.settings(cache_read_only="yes"),
        cache.settings(cache_read_only="auto", pull_request="yes", branch="old"),
    ):
        with pytest.raises(PruneRefused) as refused:
            prune(cache, settings=settings)
        assert "read-only" in refused.value.one_line()
    assert cache.tags() == before


def test_a_registry_without_deletes_is_refused_before_anything_changes(tmp_path: Path) -> None:
    with running_registry(tmp_path / "registry", delete=False) as registry, RegistryClient(
        Credentials(registry.address, "", ""), environ={}, timeout=10
    ) as client:
        cache = Cache(registry, client, tmp_path)
        cache.save("main", age_days=1)
        cache.save("old", age_days=40)
        before = cache.tags()
        with pytest.raises(DeleteDisabled) as refused:
            prune(cache)
        assert cache.tags() == before  # not even the marker turned to pruning
        assert "storage.delete.enabled: true" in refused.value.one_line()


def test_a_scope_a_prune_left_half_removed_goes_next_time(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("fresh", age_days=1)
    write_marker(cache.client, REPOSITORY, "fresh", state="pruning", branch="fresh",
                 build_id="killed", at=NOW)
    report = prune(cache)
    assert [item.reason for item in report.removed] == [
        "a prune left it half removed"
    ]
    assert cache.scope_tags("fresh") == set()


def test_a_save_during_the_prune_stops_it_for_that_scope(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("revived", age_days=40)
    seen: list[str] = []

    def saved_again(tag: str) -> None:
        seen.append(tag)
        if len(seen) == 1:  # the branch's job saves while its scope is being removed
            write_marker(cache.client, REPOSITORY, "revived", state="saved", branch="revived",
                         build_id="job-8", at=time.time())

    report = prune(cache, deleted=saved_again)
    assert report.interrupted == ["revived"]
    assert report.removed == []
    assert len(seen) == 1
    left = cache.scope_tags("revived")
    assert marker_tag("revived") in left
    assert len(left) == len(CONTENTS)
    marker = read_marker(cache.client, REPOSITORY, "revived")
    assert marker is not None
    assert marker.state == "saved"


def test_the_prune_order_marks_the_scope_first_and_removes_the_marker_last(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("old", age_days=40)
    states: list[str | None] = []

    def look(_: str) -> None:
        marker = read_marker(cache.client, REPOSITORY, "old")
        states.append(None if marker is None else marker.state)

    prune(cache, deleted=look)
    assert states == ["pruning"] * len(CONTENTS) + [None]


@pytest.mark.parametrize("step", range(len(CONTENTS) + 2))
def test_a_load_at_any_point_of_a_prune_gets_the_whole_scope_or_the_fallback(
    cache: Cache, step: int
) -> None:
    """The reader's side, between any two deletes: a scope is read only while whole.

    The load here reads tags through the registry's API as load_from_registry pulls
    them (own scope, else the fallback's, tag by tag); test_cache_prune_engine does the
    same with the engine's pulls.
    """
    cache.save("main", age_days=1, note="main")
    cache.save("old", age_days=40, note="old")
    feature = cache.settings(branch="old")
    loads: list[dict[str, str]] = []
    branches: list[str] = []

    def load(chosen: Settings) -> dict[str, str]:
        branches.append(chosen.branch)
        got = {}
        for content in CONTENTS:
            for scope in dict.fromkeys((scope_name(chosen.branch), "main")):
                digest = cache.client.manifest_digest(REPOSITORY, scoped_tag(scope, content))
                if digest is not None:
                    got[content] = scope
                    break
        return got

    def between(tag: str) -> None:
        calls.append(tag)
        if len(calls) == step:  # after the step-th delete (the marker's is the last)
            loads.append(load_whole_scope(load, feature, {}, log=quiet))

    calls: list[str] = []
    if step == 0:
        loads.append(load_whole_scope(load, feature, {}, log=quiet))
    prune(cache, deleted=between)
    assert len(loads) == 1
    assert set(loads[0].values()) in ({"old"}, {"main"})
    assert len(loads[0]) == len(CONTENTS)
    # Marked pruning when the load starts: only the fallback's scope is read.
    assert branches == (["old"] if step in (0, len(CONTENTS) + 1) else ["main"])


def test_a_load_that_a_whole_prune_overtakes_reads_the_fallback(cache: Cache) -> None:
    cache.save("main", age_days=1, note="main")
    cache.save("old", age_days=40, note="old")
    lines: list[str] = []
    chosen_branches: list[str] = []

    def load(chosen: Settings) -> str:
        chosen_branches.append(chosen.branch)
        if len(chosen_branches) == 1:
            prune(cache)  # the whole prune runs while this load pulls
        return chosen.branch

    got = load_whole_scope(load, cache.settings(branch="old"), {}, log=lines.append)
    assert got == "main"
    assert chosen_branches == ["old", "main"]
    assert lines == ["the cache scope old was pruned while it was read: loading main's "
                     "scope instead"]


def test_a_load_without_prune_reads_its_own_scope(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("feature", age_days=1)
    got = load_whole_scope(lambda s: s.branch, cache.settings(branch="feature"), {}, log=quiet)
    assert got == "feature"


def test_status_lists_each_scope_with_its_age_and_sizes(cache: Cache) -> None:
    cache.save("main", age_days=3, note="main")
    cache.save("feature/Login--x", age_days=20, note="feature")
    image(cache.client, "not-layerkeeps", "x")  # no scope: left out
    status = registry_status(cache.settings(), {}, now=NOW)
    rows = {row["scope"]: row for row in status["scopes"]}
    assert set(rows) == {"main", scope_name("feature/Login--x")}
    main, feature = rows["main"], rows[scope_name("feature/Login--x")]
    assert main["fallback"]
    assert not feature["fallback"]
    assert feature["branch"] == "feature/Login--x"
    assert round(main["age_days"]) == 3
    assert round(feature["age_days"]) == 20
    assert main["saved_by"] == "build-main"
    assert main["tags"] == {"image": 2, "record": 1, "mount": 1, "buildkit": 1}
    assert sorted(main["tag_names"]) == sorted(f"main--{content}" for content in CONTENTS)
    assert main["state"] == "saved"
    # Different notes: no blob shared, each scope's bytes are its own.
    assert main["unique_bytes"] == main["bytes"] > 0
    assert status["bytes"] == main["bytes"] + feature["bytes"]
    table = status_lines(status)
    assert table[0].startswith(f"registry cache {cache.registry.address}/{REPOSITORY}: 2 scope")
    assert any(line.startswith("main (fallback)") for line in table)


def test_shared_blobs_are_no_scopes_own(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("copy", age_days=1)  # the same images
    scopes = read_scopes(cache.client, REPOSITORY)
    doomed, kept = choose(scopes, fallback="main", older_than=0.5, live=None, now=NOW + DAY)
    # copy's images are main's: removing copy frees nothing.
    assert ([d.scope.name for d in doomed], kept) == (["copy"], ["main"])
    assert doomed[0].unique_bytes == 0


def test_a_save_marks_its_scope_and_a_read_only_one_does_not(cache: Cache) -> None:
    lines: list[str] = []
    assert mark_saved(cache.settings(branch="feature/x"), {}, log=lines.append)
    marker = read_marker(cache.client, REPOSITORY, scope_name("feature/x"))
    assert marker is not None
    assert (marker.state, marker.branch, marker.build_id) == ("saved", "feature/x", "nightly-7")
    assert abs(marker.at - time.time()) < 600
    read_only = cache.settings(branch="pr-branch", cache_read_only="yes")
    assert not mark_saved(read_only, {}, log=lines.append)
    assert read_marker(cache.client, REPOSITORY, "pr-branch") is None
    assert lines == []


# --- the tasks, as `inv` runs them ---------------------------------------------------


def inv(cache: Cache, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    (cache.project / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    settings = {
        "LAYERKEEP_IMAGE": "team/app", "LAYERKEEP_CACHE_BACKEND": "registry",
        "LAYERKEEP_REGISTRY": cache.registry.address, "LAYERKEEP_CACHE_FALLBACK_BRANCH": "main",
        "LAYERKEEP_BRANCH": "main", "LAYERKEEP_BUILD_ID": "nightly-7",
        **{f"LAYERKEEP_{key.upper()}": value for key, value in extra.items()},
    }
    environ = clean_environ(**settings)
    return subprocess.run(
        [sys.executable, "-m", "invoke", *args], cwd=cache.project, capture_output=True,
        text=True, check=False, env=environ,
    )


def test_inv_cache_prune_dry_run_then_prune(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("old", age_days=20)
    cache.save("gone", age_days=1)
    before = cache.tags()
    dry = inv(cache, "cache.prune", "--dry-run", "--branches", "main,old")
    assert dry.returncode == 0, dry.stderr
    assert cache.tags() == before
    assert "would remove gone: branch gone is gone; 6 tag(s)" in dry.stdout
    assert "would remove old: not saved for 20 days, since " in dry.stdout
    assert f"would remove 2 scope(s) of {cache.registry.address}/{REPOSITORY}" in dry.stdout

    done = inv(cache, "cache.prune", "--older-than", "30", "--branches", "main,old")
    assert done.returncode == 0, done.stderr
    assert "removed cache scope gone: branch gone is gone; 6 tag(s)" in done.stdout
    assert "registry garbage-collect --delete-untagged" in done.stdout
    assert cache.scope_tags("gone") == set()
    assert len(cache.scope_tags("old")) == len(CONTENTS) + 1


def test_inv_cache_prune_in_a_pull_request_refuses_in_one_line(cache: Cache) -> None:
    cache.save("main", age_days=1)
    cache.save("old", age_days=40)
    before = cache.tags()
    refused = inv(cache, "cache.prune", cache_read_only="auto", pull_request="yes",
                  branch="old")
    assert refused.returncode != 0
    assert cache.tags() == before
    errors = [line for line in refused.stderr.splitlines() if line.strip()]
    assert errors == [
        "layerkeep: cache.prune: cache.prune deletes nothing here, the cache is read-only in "
        "this job: a pull request build (LAYERKEEP_CACHE_READ_ONLY=auto) (run it from a "
        "scheduled job on the default branch)"
    ]
    assert "ls-remote" not in refused.stdout  # refused before asking anything
    assert "Traceback" not in refused.stderr


def test_inv_cache_status_json(cache: Cache) -> None:
    cache.save("main", age_days=2)
    shown = inv(cache, "cache.status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout.splitlines()[-1])
    assert [row["scope"] for row in status["scopes"]] == ["main"]
    assert status["scopes"][0]["fallback"]


def layered_image(client: RegistryClient, tag: str, layer: bytes) -> str:
    """An image manifest with one layer blob of ``layer``; the layer's digest."""
    digest = client.upload_blob(REPOSITORY, layer)
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2026-01-01T00:00:00Z",
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    manifest = json.dumps(
        {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
         "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                    "size": len(config), "digest": client.upload_blob(REPOSITORY, config)},
         "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                     "size": len(layer), "digest": digest}]}
    ).encode()
    client.put_manifest(REPOSITORY, tag, manifest, DOCKER_MANIFEST)
    return digest


def test_the_registry_garbage_collection_frees_what_a_prune_removed(tmp_path: Path) -> None:
    """What docs/cache-maintenance.md says to run after a prune, on the real registry."""
    folder = tmp_path / "registry"
    with running_registry(folder) as registry, RegistryClient(
        Credentials(registry.address, "", ""), environ={}, timeout=10
    ) as client:
        cache = Cache(registry, client, tmp_path)
        shared = layered_image(client, "main--latest", b"shared" * 100_000)
        layered_image(client, "old--latest", b"shared" * 100_000)
        own = layered_image(client, "old--latest-stage-builder", b"only old's" * 100_000)
        for branch, age in (("main", 1), ("old", 40)):
            write_marker(client, REPOSITORY, branch, state="saved", branch=branch,
                         build_id="b", at=NOW - age * DAY)
        report = prune(cache)
        assert [d.scope.name for d in report.removed] == ["old"]
        # Its own layer and its own configs; the shared layer is main's too.
        assert len(b"only old's" * 100_000) < report.freed < len(b"only old's" * 100_000) + 2000
        registry.stop()
    blobs = folder / "data/docker/registry/v2/blobs/sha256"

    def stored(digest: str) -> bool:
        hexdigest = digest.removeprefix("sha256:")
        return (blobs / hexdigest[:2] / hexdigest / "data").is_file()

    config = folder / "config.yml"
    plain = subprocess.run(["docker-registry", "garbage-collect", str(config)],
                           capture_output=True, text=True, check=True)
    assert stored(own), plain.stdout  # the untagged manifest still names it
    untagged = subprocess.run(
        ["docker-registry", "garbage-collect", "--delete-untagged", str(config)],
        capture_output=True, text=True, check=True,
    )
    assert not stored(own), untagged.stdout
    assert stored(shared)  # main's


def test_a_registry_without_the_cache_repository_has_no_scopes(cache: Cache) -> None:
    assert registry_status(cache.settings(), {}, now=NOW)["scopes"] == []
    report = prune(cache)
    assert (report.removed, report.kept) == ([], [])
