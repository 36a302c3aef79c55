"""Settings: precedence, env files, CI variables and one-line errors."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layerkeep.core.ci_vars import GitFacts, detect, git_facts
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import ImageRef, parse_image_ref
from layerkeep.core.service_specs import KNOWN_KINDS, SUFFIXES, service_key
from layerkeep.core.settings import KEYS, Settings, Source, load_settings, read_env_file

REPO = Path(__file__).resolve().parent.parent
NO_GIT = GitFacts(commit="", branch="")


def load(folder: Path, environ: dict[str, str] | None = None) -> Settings:
    return load_settings(folder, environ or {}, git_facts=lambda _: NO_GIT)


def test_defaults_when_nothing_is_set(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.image is None
    assert settings.builder == "auto"
    assert settings.cache_dir == tmp_path / ".layerkeep-cache"
    assert settings.context == tmp_path
    assert settings.build_id == "local"
    assert settings.project == tmp_path.name


def test_precedence_env_then_local_then_environment_then_flags(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "LAYERKEEP_IMAGE=from/env\nLAYERKEEP_BUILDER=legacy\nLAYERKEEP_CACHE_LEVEL=5\n"
        "LAYERKEEP_PROJECT=p\n"
    )
    (tmp_path / ".env.local").write_text("LAYERKEEP_IMAGE=from/local\nLAYERKEEP_CACHE_LEVEL=7\n")
    settings = load(tmp_path, {"LAYERKEEP_CACHE_LEVEL": "9"})
    assert settings.image == ImageRef("from/local")
    assert settings.builder == "legacy"
    assert settings.cache_level == 9
    assert settings.project == "p"
    assert settings.origins["LAYERKEEP_IMAGE"] == f"{tmp_path / '.env.local'}:1"
    flagged = settings.with_flags(builder="buildkit", image=None)
    assert flagged.builder == "buildkit"
    assert flagged.image == ImageRef("from/local")
    assert list(Source) == sorted(Source)


def test_env_files_do_not_touch_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAYERKEEP_IMAGE", raising=False)
    (tmp_path / ".env").write_text("LAYERKEEP_IMAGE=app\n")
    load(tmp_path)
    assert "LAYERKEEP_IMAGE" not in os.environ


def test_variables_expand_except_in_single_quotes(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("ORG=acme\nLAYERKEEP_IMAGE=${ORG}/app\nLAYERKEEP_PROJECT='${ORG}'\n")
    values = read_env_file(env, {})
    assert values["LAYERKEEP_IMAGE"][0] == "acme/app"
    assert values["LAYERKEEP_PROJECT"][0] == "${ORG}"


def test_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("LAYERKEEP_IMAGE=app\nthis is not a setting\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    message = caught.value.one_line()
    assert f"{tmp_path / '.env'}: line 2" in message
    assert "\n" not in message


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    (tmp_path / ".env.local").write_text("LAYERKEEP_BULDER=legacy\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert "LAYERKEEP_BULDER" in caught.value.one_line()
    assert "did you mean LAYERKEEP_BUILDER?" in caught.value.one_line()
    assert ".env.local:1" in caught.value.one_line()


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("LAYERKEEP_BUILDER", "kaniko", "allowed: auto, legacy, buildkit"),
        ("LAYERKEEP_IMAGE", "My App", "Docker reference"),
        ("LAYERKEEP_IMAGE", "app:bad tag", "Docker reference"),
        ("LAYERKEEP_CACHE_LEVEL", "fast", "whole number from 1 to 19"),
        ("LAYERKEEP_DOCKER_TIMEOUT", "0", "whole number from 1 to 3600"),
        ("LAYERKEEP_BUILD_ARGS", "A=1,oops", "NAME=value"),
        ("LAYERKEEP_CACHE_IMAGES", "postgres:15,Not Valid", "'Not Valid'"),
    ],
)
def test_bad_values_name_key_source_and_what_is_allowed(
    tmp_path: Path, key: str, value: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, {key: value})
    message = caught.value.one_line()
    assert key in message
    assert "environment" in message
    assert allowed in message


def test_flags_are_validated_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path).with_flags(builder="docker")
    assert "flag --builder" in caught.value.one_line()


def test_missing_image_says_how_to_set_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path).require_image()
    assert "LAYERKEEP_IMAGE is not set" in caught.value.one_line()


def test_build_args_parse(tmp_path: Path) -> None:
    settings = load(tmp_path, {"LAYERKEEP_BUILD_ARGS": "A=1, B=x=y"})
    assert dict(settings.build_args) == {"A": "1", "B": "x=y"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("app", ImageRef("app", "latest")),
        ("myorg/app:dev", ImageRef("myorg/app", "dev")),
        ("127.0.0.1:5000/team/app:1.2", ImageRef("127.0.0.1:5000/team/app", "1.2")),
        ("registry.example.com/a/b", ImageRef("registry.example.com/a/b", "latest")),
        ("App", None),
        ("app:", None),
        ("-app", None),
        ("app:" + "x" * 129, None),
    ],
)
def test_image_references(text: str, expected: ImageRef | None) -> None:
    assert parse_image_ref(text) == expected


def test_env_example_documents_exactly_the_keys_the_code_reads() -> None:
    example = read_env_file(REPO / ".env.example", {})
    documented = set(example)
    service_keys = {service_key(name, suffix) for name in KNOWN_KINDS for suffix in SUFFIXES}
    known = {key.name for key in KEYS} | service_keys
    assert documented - known == set(), "documented in .env.example but unknown to the code"
    assert known - documented == set(), "read by the code but missing from .env.example"
    defaults = {name: value for name, (value, _) in example.items()}
    assert defaults == {key.name: key.default for key in KEYS} | dict.fromkeys(service_keys, "")


def test_ci_variables_win_over_git() -> None:
    circle = detect(
        {"CIRCLECI": "true", "CIRCLE_SHA1": "abc", "CIRCLE_BRANCH": "main",
         "CIRCLE_BUILD_NUM": "42", "CIRCLE_TEST_REPORTS": "/tmp/r"}
    )
    assert (circle.commit, circle.branch, circle.build_id, circle.reports_dir) == (
        "abc", "main", "42", "/tmp/r")
    pull_request = detect(
        {"GITHUB_ACTIONS": "true", "GITHUB_SHA": "def", "GITHUB_HEAD_REF": "feature/x",
         "GITHUB_REF_NAME": "7/merge", "GITHUB_RUN_ID": "99"}
    )
    assert (pull_request.branch, pull_request.build_id) == ("feature/x", "99")
    push = detect({"GITHUB_ACTIONS": "true", "GITHUB_SHA": "def", "GITHUB_REF_NAME": "main"})
    assert push.branch == "main"
    gitlab = detect({"GITLAB_CI": "true", "CI_COMMIT_SHA": "123", "CI_COMMIT_REF_NAME": "dev",
                     "CI_JOB_ID": "5"})
    assert (gitlab.commit, gitlab.branch, gitlab.build_id) == ("123", "dev", "5")
    assert detect({}).commit == ""


def test_settings_take_ci_facts_then_git(tmp_path: Path) -> None:
    ci = load(tmp_path, {"GITHUB_ACTIONS": "1", "GITHUB_SHA": "s", "GITHUB_REF_NAME": "b",
                         "GITHUB_RUN_ID": "7"})
    assert (ci.commit, ci.branch, ci.build_id) == ("s", "b", "7")
    subprocess.run(["git", "init", "-q", "-b", "trunk", str(tmp_path)], check=True)
    subprocess.run(
        ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t",
         "commit", "-q", "--allow-empty", "-m", "first"], check=True)
    facts = git_facts(tmp_path)
    assert facts.branch == "trunk"
    assert len(facts.commit) == 40
    from_git = load_settings(tmp_path, {})
    assert (from_git.commit, from_git.branch) == (facts.commit, "trunk")
    overridden = load_settings(tmp_path, {"LAYERKEEP_BRANCH": "x", "LAYERKEEP_COMMIT": "y"})
    assert (overridden.commit, overridden.branch) == ("y", "x")


def test_services_with_kind_defaults_and_overrides(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        {
            "LAYERKEEP_SERVICES": "postgres,redis,search",
            "LAYERKEEP_REDIS_IMAGE": "redis:7.0",
            "LAYERKEEP_SEARCH_IMAGE": "example/search:1",
            "LAYERKEEP_SEARCH_CONTAINER_PORT": "9200",
            "LAYERKEEP_SEARCH_PORT": "19200",
            "LAYERKEEP_SEARCH_READY": "curl -fs localhost:9200",
            "LAYERKEEP_SEARCH_ENV": "A=1,B=x\\,y",
            "LAYERKEEP_DB_PASSWORD": "s3cret",
        },
    )
    postgres, redis, search = settings.services
    assert (postgres.kind, postgres.image) == ("postgres", "postgres:15")
    assert postgres.container_port == 5432
    assert postgres.env == {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "s3cret"}
    assert postgres.ready.startswith("pg_isready -h 127.0.0.1")
    assert (redis.kind, redis.image, redis.ready) == ("redis", "redis:7.0", "redis-cli ping")
    assert (search.kind, search.container_port, search.host_port) == ("generic", 9200, 19200)
    assert search.env == {"A": "1", "B": "x,y"}
    assert settings.test_env == {"DATABASE_URL": "{postgres.url}", "REDIS_URL": "{redis.url}"}
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LAYERKEEP_SERVICES": "Postgres"}, "LAYERKEEP_SERVICES='Postgres'"),
        ({"LAYERKEEP_SERVICES": "search"}, "LAYERKEEP_SEARCH_IMAGE='' (from default)"),
        ({"LAYERKEEP_SERVICES": "redis", "LAYERKEEP_REDIS_PORT": "99999"}, "port number"),
        ({"LAYERKEEP_SERVICES": "redis", "LAYERKEEP_REDIS_KIND": "mysql"}, "allowed: postgres"),
        ({"LAYERKEEP_MYSQL_IMAGE": "mysql:8"}, "add mysql to LAYERKEEP_SERVICES"),
        ({"LAYERKEEP_POSTGRES_IMAG": "x"}, "did you mean LAYERKEEP_POSTGRES_IMAGE?"),
        (
            {"LAYERKEEP_SERVICES": "postgres", "LAYERKEEP_TEST_ENV": "DB={postgres.uri}"},
            "facts: host, port, user, password, database, url",
        ),
        (
            {"LAYERKEEP_SERVICES": "postgres", "LAYERKEEP_TEST_ENV": "R={redis.url}"},
            "services: postgres",
        ),
        ({"LAYERKEEP_TEST_MOUNTS": "tests:app/tests"}, "host-folder:/container/path"),
        ({"LAYERKEEP_KEEP_SERVICES": "maybe"}, "use yes or no"),
    ],
)
def test_bad_service_and_test_settings(
    tmp_path: Path, environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, environ)
    assert expected in caught.value.one_line()


def test_test_settings(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        {
            "LAYERKEEP_SERVICES": "postgres",
            "LAYERKEEP_TEST_ENV": "POSTGRES_HOST={postgres.host},DEBUG=0",
            "LAYERKEEP_TEST_MOUNTS": "tests:/app/tests:ro,data:/data",
            "LAYERKEEP_KEEP_SERVICES": "yes",
        },
    )
    assert settings.test_env == {"POSTGRES_HOST": "{postgres.host}", "DEBUG": "0"}
    assert [(m.source, m.target, m.read_only) for m in settings.test_mounts] == [
        (tmp_path / "tests", "/app/tests", True),
        (tmp_path / "data", "/data", False),
    ]
    assert settings.keep_services
    assert settings.reports_dir == tmp_path / "reports"
    circle = load(tmp_path, {"CIRCLECI": "true", "CIRCLE_TEST_REPORTS": "/tmp/circle"})
    assert circle.reports_dir == Path("/tmp/circle")
