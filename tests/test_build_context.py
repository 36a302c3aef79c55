"""layerkeep's own files stay out of the build context, and `COPY .` projects hit fully.

The fixture ``fixtures/copyapp`` has the shape of most real projects: a root
Dockerfile whose two stages each ``COPY . /opt/app``, default settings, so the cache
(``.layerkeep-cache``) and the JUnit reports (``reports/``) are written into the build
context. Each builder runs the job three times as ``inv ci`` would (restore, build, test,
save); before the second and third runs the images and the builder's own cache are
removed, so every reused step can only come from the restored cache.

The classic builder runs on the main engine (its cache is the images' parent chains,
removed with them). BuildKit keeps a cache of its own that only a global prune clears,
so its runs use a throw-away engine (tests/second_engine.py): Debian's 20.10 with its
20.10 CLI, and Docker 26 with buildx.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SESSION_LABEL, TEST_LABEL, TEST_REPOSITORY, remove_test_images
from second_engine import SecondEngineUnavailable, ensure_docker26, second_engine, transfer_images

from layerkeep.building.build_plan import plan_build
from layerkeep.building.builder import Builder, choose_builder
from layerkeep.building.context import (
    context_excludes,
    dockerfile_with_excludes,
    preflight_context,
)
from layerkeep.building.image import BuildReport, _shortest_first, build_image
from layerkeep.cache.backend import load_cache, save_cache
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, connect
from layerkeep.core.job import Job
from layerkeep.core.settings import Settings, load_settings
from layerkeep.testrun.run import run_tests

FIXTURE = Path(__file__).parent.parent / "fixtures" / "copyapp"
PYTHON = "python:3.11-slim"


def quiet(_: str) -> None:
    pass


def settings_for(project: Path, environ: Mapping[str, str] | None = None) -> Settings:
    return load_settings(project, environ or {}, git_facts=lambda _: GitFacts("", ""))


def copy_fixture(root: Path) -> Path:
    project = root / "copyapp"
    shutil.copytree(FIXTURE, project)
    return project


# ---- where layerkeep writes, without an engine ---------------------------------------


def test_default_outputs_inside_the_context_are_excluded(tmp_path: Path) -> None:
    settings = settings_for(copy_fixture(tmp_path))
    assert settings.context.resolve() == settings.project_dir.resolve()
    assert context_excludes(settings) == ("/.layerkeep-cache", "/reports")
    assert preflight_context(settings) == []


def test_outputs_outside_a_sub_context_need_no_exclusion(tmp_path: Path) -> None:
    project = copy_fixture(tmp_path)
    (project / "app").mkdir()
    shutil.move(project / "Dockerfile", project / "app" / "Dockerfile")
    settings = settings_for(project, {"LAYERKEEP_CONTEXT": "app"})
    assert context_excludes(settings) == ()
    assert preflight_context(settings) == []


def test_nested_and_custom_output_folders_are_excluded(tmp_path: Path) -> None:
    settings = settings_for(
        copy_fixture(tmp_path),
        {"LAYERKEEP_CACHE_DIR": "ci/cache", "LAYERKEEP_REPORTS_DIR": "#junit"},
    )
    assert context_excludes(settings) == ("/ci/cache", "/#junit")


def test_a_temporary_folder_inside_the_context_is_excluded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = copy_fixture(tmp_path)
    (project / "tmp").mkdir()
    monkeypatch.setenv("TMPDIR", str(project / "tmp"))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() caches its answer
    assert context_excludes(settings_for(project))[-1] == "/tmp"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"LAYERKEEP_CACHE_DIR": "."}, "LAYERKEEP_CACHE_DIR"),
        ({"LAYERKEEP_REPORTS_DIR": "."}, "LAYERKEEP_REPORTS_DIR"),
    ],
)
def test_preflight_names_an_output_that_is_the_context(
    tmp_path: Path, environ: dict[str, str], key: str
) -> None:
    problems = preflight_context(settings_for(copy_fixture(tmp_path), environ))
    assert len(problems) == 1
    assert problems[0].startswith(f"{key}=")
    assert "build context" in problems[0]
    assert f"set {key} to a folder of its own" in problems[0]
    assert "\n" not in problems[0]


def test_preflight_names_a_copy_of_an_excluded_folder(tmp_path: Path) -> None:
    project = copy_fixture(tmp_path)
    dockerfile = project / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "COPY ./reports/ /opt/reports/\n")
    problems = preflight_context(settings_for(project))
    assert problems == [
        f"Dockerfile copies ./reports/ from LAYERKEEP_REPORTS_DIR={project / 'reports'}, "
        "which layerkeep keeps out of the build context: point LAYERKEEP_REPORTS_DIR "
        "elsewhere, or copy the files from another folder"
    ]


def test_preflight_reads_a_copy_in_json_form(tmp_path: Path) -> None:
    project = copy_fixture(tmp_path)
    dockerfile = project / "Dockerfile"
    dockerfile.write_text(
        dockerfile.read_text() + 'COPY ["app.py","reports/junit.xml","/opt/"]\n'
        "COPY --from=0 reports/ /opt/reports/\n"
    )
    problems = preflight_context(settings_for(project))
    assert len(problems) == 1
    assert problems[0].startswith("Dockerfile copies reports/junit.xml from LAYERKEEP_REPORTS_DIR")


def test_buildkit_ignore_file_keeps_the_users_rules_first(tmp_path: Path) -> None:
    project = copy_fixture(tmp_path)
    (project / ".dockerignore").write_text("**/__pycache__\n!reports/keep.txt\n")
    excludes = ("/.layerkeep-cache", "/reports")
    with dockerfile_with_excludes(project / "Dockerfile", project, excludes) as copy:
        assert copy.read_text() == (project / "Dockerfile").read_text()
        ignore = copy.with_name("Dockerfile.dockerignore").read_text().splitlines()
        assert ignore[:2] == ["**/__pycache__", "!reports/keep.txt"]
        assert ignore[-2:] == list(excludes)
        folder = copy.parent
    assert not folder.exists()
    # A Dockerfile-specific ignore file replaces .dockerignore for BuildKit: it is the base.
    (project / "Dockerfile.dockerignore").write_text("tests\n")
    with dockerfile_with_excludes(project / "Dockerfile", project, excludes) as copy:
        ignore = copy.with_name("Dockerfile.dockerignore").read_text().splitlines()
        assert ignore[0] == "tests"
        assert "**/__pycache__" not in ignore


def test_stage_chains_are_ordered_shortest_first() -> None:
    # Two stage chains (nearest first) sharing their first two images.
    build = ["b3", "b2", "w1", "base"]
    other = ["o4", "o3", "b2", "w1", "base"]
    ordered = _shortest_first([build, other])
    assert ordered[:3] == ["base", "w1", "b2"]
    assert ordered.index("b3") < ordered.index("o4")
    assert ordered.index("o3") < ordered.index("o4")
    assert len(ordered) == len(set(ordered)) == 6


# ---- the fixture on real engines ------------------------------------------------------


# The BuildKit targets run on second engines of their own (the classic one on the main).
PRIVATE_KINDS = [
    pytest.param(kind, marks=pytest.mark.private_engines) for kind in ("buildkit", "buildx")
]


@dataclass(frozen=True)
class Target:
    """An engine to run the job on, the environment reaching it, and its builder."""

    engine: Engine
    environ: Mapping[str, str]
    builder: Builder
    private: bool


@contextlib.contextmanager
def target_for(kind: str, main: Engine, folder: Path) -> Iterator[Target]:
    environ = dict(os.environ)
    if kind == "legacy":
        yield Target(main, environ, Builder("legacy"), private=False)
        return
    try:
        docker26 = ensure_docker26() if kind == "buildx" else None
        with second_engine(folder / "engine", docker26=docker26) as second:
            transfer_images(environ, second.environ, [PYTHON])
            engine = connect(second.environ, labels=dict([TEST_LABEL, SESSION_LABEL]))
            try:
                builder = choose_builder("buildkit", second.environ, engine=engine)
                yield Target(engine, second.environ, builder, private=True)
            finally:
                engine.close()
    except SecondEngineUnavailable as error:
        pytest.skip(str(error))


def unique_base(engine: Engine, repository: str, folder: Path) -> str:
    """python:3.11-slim plus a layer of its own, so no earlier build's cache can match."""
    folder.mkdir()
    (folder / "Dockerfile").write_text(
        f"FROM {PYTHON}\nRUN echo {repository} > /etc/layerkeep-test-run\n"
    )
    base = f"{repository}-base:1"
    engine.build(folder, tag=base)
    return base


def project_on(target: Target, folder: Path, repository: str) -> tuple[Settings, str]:
    """The fixture, built from a base of its own, with images under ``repository``."""
    base = unique_base(target.engine, repository, folder / "base")
    project = copy_fixture(folder)
    dockerfile = project / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text().replace(f"FROM {PYTHON}", f"FROM {base}"))
    settings = settings_for(project, {"LAYERKEEP_IMAGE": f"{repository}/app"})
    return settings, base


def ci(target: Target, settings: Settings) -> BuildReport:
    """What `inv ci` does with the image: restore, build, run the tests, save."""
    load_cache(target.engine, settings, target.builder, log=quiet)
    report = build_image(target.engine, settings, target.builder, target.environ, log=quiet)
    job_engine = target.engine.for_job(Job.from_settings(settings))
    tests = run_tests(job_engine, settings, log=quiet)
    assert tests.passed
    assert tests.reports == (settings.reports_dir / "junit.xml",)
    save_cache(target.engine, settings, target.builder, target.environ, log=quiet)
    return report


def wipe(target: Target, settings: Settings, base: str) -> None:
    """Remove the app and stage images, and every builder cache of them."""
    for image in plan_build(settings).images:
        target.engine.remove_image(str(image))
    if target.private:
        target.engine.api.prune_builds(all=True)  # a throw-away engine: all of it is ours
    base_id = target.engine.image_id(base)
    leftovers = [
        image["Id"] for image in target.engine.api.images(all=True)
        if image.get("ParentId") == base_id
    ]
    assert leftovers == [], "the classic builder's parent chains survived the wipe"


def listing(target: Target, image: str) -> list[str]:
    done = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "ls", image, "-A", "/opt/app"],
        env=dict(target.environ), capture_output=True, text=True, check=True, timeout=120,
    )
    return done.stdout.split()


@pytest.mark.docker
@pytest.mark.parametrize("kind", ["legacy", *PRIVATE_KINDS])
def test_copy_dot_project_with_default_settings_reuses_every_step_after_a_restore(
    engine: Engine, tmp_path: Path, kind: str
) -> None:
    repository = f"{TEST_REPOSITORY}/{uuid.uuid4().hex[:10]}"
    with target_for(kind, engine, tmp_path) as target:
        try:
            settings, base = project_on(target, tmp_path, repository)
            project = settings.project_dir
            assert settings.reports_dir == project / "reports"
            assert settings.cache_dir == project / ".layerkeep-cache"

            cold = ci(target, settings)
            # Only the final stage's WORKDIR and COPY . may reuse the first stage's.
            assert cold.tally.reused <= 2
            assert not any(v for k, v in cold.tally.reused_by_key.items() if "RUN" in k)
            assert cold.tally.total >= 5  # BuildKit runs the steps both stages share once
            assert (project / ".layerkeep-cache" / "manifest.json").is_file()
            first_report = (project / "reports" / "junit.xml").read_text()

            runs = []
            for _ in range(2):
                wipe(target, settings, base)
                runs.append(ci(target, settings))
            for warm in runs:
                assert warm.tally.reused == warm.tally.total >= 5, warm.tally.reused_by_key
                if kind == "legacy":
                    # buildx names a vertex both stages share after either stage: only
                    # the classic builder's step list is the same from run to run.
                    assert warm.tally.total == cold.tally.total
            # The context really changed between the runs: new reports were written.
            assert (project / "reports" / "junit.xml").read_text() != first_report
            app = str(settings.require_image())
            stage = str(plan_build(settings).images[0])
            assert all(target.engine.image_id(image) for image in (app, stage))
            for image in (app, stage):
                contents = listing(target, image)
                assert "greeter" in contents
                assert ".layerkeep-cache" not in contents
                assert "reports" not in contents
        finally:
            if not target.private:
                remove_test_images(target.engine, repository)


@pytest.mark.docker
@pytest.mark.parametrize("kind", ["legacy", PRIVATE_KINDS[0]])
def test_cache_images_a_partial_restore_did_not_reuse_are_removed(
    engine: Engine, tmp_path: Path, kind: str
) -> None:
    repository = f"{TEST_REPOSITORY}/{uuid.uuid4().hex[:10]}"
    with target_for(kind, engine, tmp_path) as target:
        try:
            settings, base = project_on(target, tmp_path, repository)
            ci(target, settings)
            wipe(target, settings, base)
            source = settings.project_dir / "greeter" / "__init__.py"
            source.write_text(source.read_text().replace("hello", "hello there"))
            load_cache(target.engine, settings, target.builder, log=quiet)
            images = [str(image) for image in plan_build(settings).images]
            loaded = {image: target.engine.image_id(image) for image in images}
            assert all(loaded.values())

            lines: list[str] = []
            report = build_image(
                target.engine, settings, target.builder, target.environ, log=lines.append
            )

            assert 0 < report.tally.reused < report.tally.total
            for image, old in loaded.items():
                assert old is not None
                assert target.engine.image_id(image) not in (None, old)
                assert target.engine.image_id(old) is None, f"{image}'s restored copy was kept"
                assert f"removed {old[:19]}, which this build replaced" in lines
        finally:
            if not target.private:
                remove_test_images(target.engine, repository)
