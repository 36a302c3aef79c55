"""Why the cache missed: real builds, a saved and restored cache, then one change each.

Each docker test builds a small two-stage project (classic builder and BuildKit), saves
the cache, removes the project's images (what a fresh machine lacks), restores the cache,
makes one change and builds again: the first miss of each stage must name the change.
Every project carries a unique marker in its steps, so no builder cache left by another
test or session can answer a step (the shared engine's caches are never pruned).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from gitrepos import Scripted
from registry_setup import running_registry

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.build_records import (
    RECORDS_FILE,
    Maker,
    kept_records,
    record_image,
    records_text,
)
from layerkeep.building.builder import choose_builder
from layerkeep.building.explain import MissLine, files_changed, first_misses, miss_files
from layerkeep.building.image import BuildReport, build_image
from layerkeep.building.output import StepTally
from layerkeep.building.step_inputs import ContextFiles, StageInputs, read_inputs
from layerkeep.cache.backend import load_cache, save_cache
from layerkeep.cache.registry_backend import cache_location, cache_scope
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.settings import Settings, load_settings

DOCKERFILE = """\
FROM {base} AS deps
ARG TOKEN
RUN echo "deps {marker} $TOKEN" | sha256sum > /deps.txt
COPY lib/ /lib/

FROM {base}
COPY --from=deps /deps.txt /deps.txt
WORKDIR /app
COPY src /app/src
RUN cat /app/src/main.txt > /app/out.txt
"""
IGNORE = "src/*.log\nnotes\n"


@dataclass(frozen=True)
class Project:
    root: Path
    base: str
    marker: str
    extra: dict[str, str]

    def settings(self, **values: str) -> Settings:
        environ = {**self.extra, **values}
        return load_settings(self.root, environ, git_facts=lambda _: GitFacts("", ""))


def make_project(root: Path, repository: str, engine: Engine, **extra: str) -> Project:
    marker = uuid.uuid4().hex[:12]
    base = f"{repository}-base:1"
    engine.tag_image("debian:bookworm-slim", base)
    for folder in ("src", "lib", "notes"):
        (root / folder).mkdir(parents=True)
    (root / "src" / "main.txt").write_text(f"hello {marker}\n")
    (root / "src" / "old.txt").write_text("old\n")
    (root / "src" / "debug.log").write_text("log\n")
    (root / "lib" / "lib.txt").write_text("lib\n")
    (root / "notes" / "todo.txt").write_text("todo\n")
    (root / "Dockerfile").write_text(DOCKERFILE.format(base=base, marker=marker))
    (root / ".dockerignore").write_text(IGNORE)
    (root / ".env").write_text(
        f"LAYERKEEP_IMAGE={repository}/app\nLAYERKEEP_CACHE_DIR=cache\n"
        f"LAYERKEEP_BUILD_ARGS=TOKEN=first-{marker}\n"
    )
    return Project(root, base, marker, dict(extra))


def build(engine: Engine, settings: Settings, kind: str, lines: list[str]) -> BuildReport:
    builder = choose_builder(kind, os.environ, engine=engine)
    return build_image(engine, settings, builder, os.environ, log=lines.append)


def restored(engine: Engine, project: Project, kind: str) -> None:
    """Build cold, save the cache, remove the project's images, restore the cache."""
    settings = project.settings()
    cold = build(engine, settings, kind, [])
    assert cold.tally.reused < cold.tally.total
    assert cold.miss_reasons == ("cache miss: no cached image to compare with (cold build)",)
    save_cache(engine, settings, cold.builder, os.environ, log=lambda _: None)
    record = record_image(settings)
    assert record is not None
    for image in [*images_to_cache(settings), str(record)]:
        engine.remove_image(image, force=True)
    load_cache(engine, settings, cold.builder, log=lambda _: None)
    assert all(engine.image_id(image) for image in images_to_cache(settings))


def reasons_by_stage(report: BuildReport) -> dict[str, str]:
    """``deps`` / ``final stage`` -> its line."""
    found: dict[str, str] = {}
    for line in report.miss_reasons:
        stage = line.removeprefix("cache miss in ").split(" at ", 1)[0]
        found[stage] = line
    return found


kinds = pytest.mark.parametrize("kind", ["legacy", "buildkit"])


@pytest.mark.docker
@kinds
def test_changed_added_and_removed_context_files_are_named(
    engine: Engine, unique_repository: str, tmp_path: Path, kind: str
) -> None:
    project = make_project(tmp_path, unique_repository, engine)
    restored(engine, project, kind)
    (tmp_path / "src" / "main.txt").write_text(f"changed {project.marker}\n")
    (tmp_path / "src" / "new.txt").write_text("new\n")
    (tmp_path / "src" / "old.txt").unlink()
    (tmp_path / "src" / "debug.log").write_text("more log\n")  # left out by .dockerignore

    lines: list[str] = []
    report = build(engine, project.settings(), kind, lines)

    reasons = reasons_by_stage(report)
    assert list(reasons) == ["final stage"]  # deps reads nothing that changed
    assert reasons["final stage"] == (
        "cache miss in final stage at `COPY src /app/src`: context files changed: "
        "src/main.txt (changed), src/new.txt (added), src/old.txt (removed)"
    )
    assert reasons["final stage"] in lines


@pytest.mark.docker
@kinds
def test_changed_build_arg_is_named_and_its_value_never_shown(
    engine: Engine, unique_repository: str, tmp_path: Path, kind: str
) -> None:
    project = make_project(tmp_path, unique_repository, engine)
    restored(engine, project, kind)
    secret = f"second-{project.marker}"

    report = build(engine, project.settings(LAYERKEEP_BUILD_ARGS=f"TOKEN={secret}"), kind, [])

    reasons = reasons_by_stage(report)
    assert reasons["deps"].endswith(": build argument TOKEN changed")
    # The final stage copies what deps made: it says so instead of guessing.
    assert reasons["final stage"] == (
        "cache miss in final stage at `COPY --from=deps /deps.txt /deps.txt`: "
        "stage deps, which it builds on, was rebuilt"
    )
    settings = project.settings()
    records = (tmp_path / "cache" / RECORDS_FILE).read_text()  # as saved with the cache
    records += records_text(kept_records(engine, settings, log=print))  # as this build kept
    assert "arg:TOKEN" in records
    for value in (secret, f"first-{project.marker}"):
        assert value not in " ".join(report.miss_reasons)
        assert value not in records


@pytest.mark.docker
@kinds
def test_base_image_resolving_to_another_id_is_named(
    engine: Engine, unique_repository: str, tmp_path: Path, kind: str
) -> None:
    project = make_project(tmp_path, unique_repository, engine)
    restored(engine, project, kind)
    was, now = engine.image_id("debian:bookworm-slim"), engine.image_id("python:3.11-slim")
    assert was is not None
    assert now is not None
    assert was != now
    engine.tag_image("python:3.11-slim", project.base)

    report = build(engine, project.settings(), kind, [])

    reasons = reasons_by_stage(report)
    assert sorted(reasons) == ["deps", "final stage"]
    for line in reasons.values():
        assert line.endswith(
            f": base image {project.base} now resolves to {now[:19]} (was {was[:19]})"
        )


@pytest.mark.docker
@kinds
def test_changed_dockerfile_line_shows_old_and_new_text(
    engine: Engine, unique_repository: str, tmp_path: Path, kind: str
) -> None:
    project = make_project(tmp_path, unique_repository, engine)
    restored(engine, project, kind)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace("/app/out.txt", "/app/result.txt"))

    report = build(engine, project.settings(), kind, [])

    assert report.miss_reasons == (
        "cache miss in final stage at `RUN cat /app/src/main.txt > /app/result.txt`: "
        "instruction changed: `RUN cat /app/src/main.txt > /app/out.txt` -> "
        "`RUN cat /app/src/main.txt > /app/result.txt`",
    )


@pytest.mark.docker
@kinds
def test_files_the_dockerignore_leaves_out_cause_no_miss(
    engine: Engine, unique_repository: str, tmp_path: Path, kind: str
) -> None:
    project = make_project(tmp_path, unique_repository, engine)
    restored(engine, project, kind)
    (tmp_path / "src" / "debug.log").write_text("more log\n")
    (tmp_path / "notes" / "todo.txt").write_text("more to do\n")
    (tmp_path / "notes" / "new.txt").write_text("new\n")

    report = build(engine, project.settings(), kind, [])

    assert report.tally.reused == report.tally.total
    assert report.miss_reasons == ()


@pytest.mark.docker
def test_records_travel_with_a_registry_cache(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    with running_registry(tmp_path / "registry") as registry:
        project = make_project(
            tmp_path / "project", unique_repository, engine,
            LAYERKEEP_CACHE_BACKEND="registry", LAYERKEEP_REGISTRY=registry.address,
        )
        settings = project.settings()
        repository = cache_location(settings).repository
        try:
            restored(engine, project, "legacy")
            path = repository.removeprefix(f"{registry.address}/")
            _, listing, _ = registry.get(f"/v2/{path}/tags/list")
            # In the branch's scope, like the cache tags beside it.
            assert cache_scope(settings).tag("latest-build-record") in listing["tags"]
            assert not (project.root / "cache").exists()  # nothing written into the context
            (project.root / "lib" / "lib.txt").write_text("changed\n")

            report = build(engine, settings, "legacy", [])

            assert reasons_by_stage(report)["deps"] == (
                "cache miss in deps at `COPY lib/ /lib/`: context files changed: "
                "lib/lib.txt (changed)"
            )
        finally:
            for image in engine.api.images():
                for tag in image.get("RepoTags") or []:
                    if tag.startswith(f"{registry.address}/"):
                        engine.remove_image(tag, force=True)


@pytest.mark.docker
def test_without_a_record_the_reason_is_unknown_and_says_so(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    project = make_project(tmp_path, unique_repository, engine)
    restored(engine, project, "legacy")
    (tmp_path / "cache" / RECORDS_FILE).unlink()
    (tmp_path / "src" / "main.txt").write_text("changed\n")

    report = build(engine, project.settings(), "legacy", [])

    app = f"{unique_repository}/app:latest"
    assert report.miss_reasons == (
        "cache miss in final stage at `COPY src /app/src`: unknown: no record of the build "
        f"that made the cached image(s) {app}, {app}-stage-deps, so nothing to compare with",
    )
    # This build's record is kept, and goes with the next save.
    settings = project.settings()
    assert kept_records(engine, settings, log=print)[0].images == {
        image: engine.image_id(image) for image in images_to_cache(settings)
    }
    save_cache(engine, settings, report.builder, os.environ, log=lambda _: None)
    assert json.loads((tmp_path / "cache" / RECORDS_FILE).read_text())["records"]


GIT_PROJECT = """\
FROM {base}
WORKDIR /app
COPY . /app
RUN cat /app/src/app.py > /app/out.txt
"""


@pytest.mark.docker
def test_with_git_in_the_context_the_file_you_edited_comes_first(
    engine: Engine, unique_repository: str, tmp_path: Path
) -> None:
    """No .dockerignore, so `COPY .` reads .git: a commit changes a dozen files in it,
    which come before src/ alphabetically."""
    marker = uuid.uuid4().hex[:12]
    base = f"{unique_repository}-base:1"
    engine.tag_image("debian:bookworm-slim", base)
    repo = Scripted(tmp_path)
    repo.write("Dockerfile", GIT_PROJECT.format(base=base))
    repo.write("src/app.py", f"print('{marker}')\n")
    repo.write(".env", f"LAYERKEEP_IMAGE={unique_repository}/app\nLAYERKEEP_CACHE_DIR=cache\n")
    repo.commit("first", when=1_700_000_000)
    settings = load_settings(tmp_path, {}, git_facts=lambda _: GitFacts("", ""))
    build(engine, settings, "legacy", [])
    repo.write("src/app.py", f"print('{marker}, edited')\n")
    repo.commit("edit", when=1_700_000_100)

    lines: list[str] = []
    report = build(engine, settings, "legacy", lines)

    [line] = report.miss_reasons
    shown = re.fullmatch(
        r"cache miss in final stage at `COPY \. /app`: (\d+) context files changed: "
        r"src/app\.py \(changed\) and (\d+) in \.git/",
        line,
    )
    assert shown, line
    assert line in lines
    # Every file is in the report, the edited one first.
    assert isinstance(line, MissLine)
    assert next(iter(line.files)) == "src/app.py"
    assert len(line.files) == int(shown[1]) == int(shown[2]) + 1
    assert line.files["src/app.py"] == "changed"
    assert line.files[".git/index"] == "changed"
    assert miss_files(report.miss_reasons) == {"final stage": dict(line.files)}


# --- without an engine ----------------------------------------------------------------


def test_changed_files_name_yours_first_and_count_the_tools() -> None:
    git = {".git/COMMIT_EDITMSG": "changed", ".git/config": "changed", ".git/index": "changed"}
    git |= {f".git/objects/{n:02x}/0bad": "added" for n in range(12)}
    line = files_changed({**git, "src/app.py": "changed"})
    assert line == "16 context files changed: src/app.py (changed) and 15 in .git/"
    assert list(line.files) == ["src/app.py", *sorted(git)]
    assert line.files["src/app.py"] == "changed"

    yours = {"b.py": "added", "a.py": "changed", ".env": "changed", "c/d.py": "removed"}
    line = files_changed({**yours, **git, ".venv/lib/x.py": "added", "web/.cache/y": "added"})
    assert line == (
        "21 context files changed: .env (changed), a.py (changed), b.py (added), 1 more, "
        "15 in .git/, 1 in .venv/ and 1 in web/.cache/"
    )
    assert list(line.files)[:4] == [".env", "a.py", "b.py", "c/d.py"]
    assert len(line.files) == 21

    # Only the tools' files changed: they are named.
    assert files_changed(git) == (
        "15 context files changed, all in .git/: .git/COMMIT_EDITMSG (changed), "
        ".git/config (changed), .git/index (changed) and 12 more"
    )
    # Few enough to name them all: no count.
    assert files_changed({"src/b": "added", "src/a": "changed"}) == (
        "context files changed: src/a (changed), src/b (added)"
    )
    assert files_changed({".git/index": "changed", "src/a": "changed"}) == (
        "2 context files changed: src/a (changed) and 1 in .git/"
    )


def stages_of(tmp_path: Path, dockerfile: str) -> list[StageInputs]:
    """The steps of ``dockerfile`` as the classic builder would read them (no base image)."""
    (tmp_path / "Dockerfile").write_text(dockerfile)
    (tmp_path / ".env").write_text("LAYERKEEP_IMAGE=app\n")
    settings = load_settings(tmp_path, {}, git_facts=lambda _: GitFacts("", ""))
    files = ContextFiles(tmp_path, [], {})
    return read_inputs(
        tmp_path / "Dockerfile", settings.build_args, lookup=lambda _: None, files=files
    )


TWO_STAGES = """\
FROM scratch AS deps
ENV A=1 \\
    B=2
COPY a /a

FROM scratch
WORKDIR /app
ENV C=3
COPY --from=deps /a /a
"""


def test_first_misses_follow_each_builders_numbering(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    stages = stages_of(tmp_path, TWO_STAGES)
    assert [step.text for step in stages[0].steps] == [
        "FROM scratch AS deps", "ENV A=1 B=2", "COPY a /a"
    ]
    legacy = StepTally()
    for key, reused in [("0:ENV A=1     B=2", True), ("0:COPY a /a", False),
                        ("1:WORKDIR /app", True), ("1:ENV C=3", False),
                        ("1:COPY --from=deps /a /a", False)]:
        legacy.record(key, reused)
    assert first_misses(legacy, "legacy", stages) == {0: 2, 1: 2}
    # BuildKit numbers RUN/COPY/ADD/WORKDIR only: ENV is no step of its own.
    buildkit = StepTally()
    for key, reused in [("deps 2/2:COPY a /a", True), ("stage-1 2/3:WORKDIR /app", True),
                        ("stage-1 3/3:COPY --from=deps /a /a", False)]:
        buildkit.record(key, reused)
    assert first_misses(buildkit, "buildkit", stages) == {1: 3}


def test_a_record_made_by_another_docker_generation_or_builder_says_so() -> None:
    old = Maker("20.10.24+dfsg1", "buildkit")
    new = Maker("26.1.5+dfsg1", "buildkit")
    reason = new.unlike(old)
    assert reason is not None
    assert "Docker 20.10.24+dfsg1's BuildKit" in reason
    assert "Docker 26.1.5+dfsg1's BuildKit" in reason
    assert "keep one Docker generation per cache" in reason
    assert "never share steps" in str(Maker("26.1.5", "legacy").unlike(new))
    assert "can differ" in str(Maker("27.0.1", "buildkit").unlike(new))
    assert new.unlike(new) is None
    assert new.unlike(Maker("", "")) is None  # a record from an older layerkeep


def test_a_file_whose_size_and_mtime_match_the_last_record_is_not_read_again(
    tmp_path: Path,
) -> None:
    """git.touch gives a committed file its last commit's time on every machine, so
    the last record's digest stands for it: a large context costs the next build nothing."""
    (tmp_path / "big.bin").write_bytes(b"x" * 4096)
    os.utime(tmp_path / "big.bin", ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    info = (tmp_path / "big.bin").stat()
    known = {"big.bin": (info.st_size, info.st_mtime_ns, "from-the-last-record")}

    assert ContextFiles(tmp_path, [], known).digest("big.bin") == "from-the-last-record"
    # Another mtime (an edited, uncommitted file): read again.
    os.utime(tmp_path / "big.bin", ns=(1_700_000_001 * 10**9, 1_700_000_001 * 10**9))
    files = ContextFiles(tmp_path, [], known)
    fresh = files.digest("big.bin")
    assert fresh != "from-the-last-record"
    assert files.read["big.bin"][2] == fresh
