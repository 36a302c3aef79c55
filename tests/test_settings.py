"""Settings: precedence, env files, CI variables and one-line errors."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import fields
from pathlib import Path

import pytest

from layerkeep.core.ci_vars import GitFacts, detect, git_facts, safe_build_id
from layerkeep.core.errors import ConfigError
from layerkeep.core.imageref import ImageRef, parse_image_ref
from layerkeep.core.secrets import MASK
from layerkeep.core.service_specs import KNOWN_KINDS, SUFFIXES, service_key
from layerkeep.core.settings import (
    KEYS,
    Settings,
    Source,
    describe_settings,
    load_settings,
    read_env_file,
)
from layerkeep.core.settings.reference import COMMAND as REFERENCE_COMMAND
from layerkeep.core.settings.reference import reference

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


def test_precedence_files_then_environment_then_flags(tmp_path: Path) -> None:
    (tmp_path / "layerkeep.env").write_text(
        "LAYERKEEP_IMAGE=from/committed\nLAYERKEEP_DOCKERFILE=ci.Dockerfile\n"
        "LAYERKEEP_BUILDER=buildkit\n"
    )
    (tmp_path / ".env").write_text(
        "LAYERKEEP_IMAGE=from/env\nLAYERKEEP_BUILDER=legacy\nLAYERKEEP_CACHE_LEVEL=5\n"
        "LAYERKEEP_PROJECT=p\n"
    )
    (tmp_path / ".env.local").write_text("LAYERKEEP_IMAGE=from/local\nLAYERKEEP_CACHE_LEVEL=7\n")
    settings = load(tmp_path, {"LAYERKEEP_CACHE_LEVEL": "9"})
    assert settings.dockerfile == Path("ci.Dockerfile")
    assert settings.image == ImageRef("from/local")
    assert settings.builder == "legacy"
    assert settings.cache_level == 9
    assert settings.project == "p"
    assert settings.env_files == (
        tmp_path / "layerkeep.env", tmp_path / ".env", tmp_path / ".env.local")
    assert settings.origins["LAYERKEEP_DOCKERFILE"] == f"{tmp_path / 'layerkeep.env'}:2"
    assert settings.origins["LAYERKEEP_IMAGE"] == f"{tmp_path / '.env.local'}:1"
    assert settings.origins["LAYERKEEP_CACHE_LEVEL"] == "environment"
    assert settings.origins["LAYERKEEP_CONTEXT"] == "default"
    flagged = settings.with_flags(builder="buildkit", image=None, cache_level="")
    assert flagged.builder == "buildkit"
    assert flagged.image == ImageRef("from/local")
    assert flagged.cache_level == 9
    assert flagged.origins["LAYERKEEP_BUILDER"] == "flag --builder"
    assert flagged.origins["LAYERKEEP_IMAGE"] == f"{tmp_path / '.env.local'}:1"
    assert settings.origins["LAYERKEEP_BUILDER"] == f"{tmp_path / '.env'}:2"
    assert settings.with_flags(image=None) is settings
    assert list(Source) == sorted(Source)
    assert [s.name for s in Source] == ["DEFAULT", "ENV_FILE", "ENVIRONMENT", "FLAG"]


def test_env_files_from_the_environment_replace_the_list(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("SECRET_KEY=the-app-s-own\nDJANGO_DEBUG=1\n")
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "layerkeep.env").write_text("LAYERKEEP_IMAGE=from/ci\n")
    (tmp_path / "layerkeep.env").write_text("LAYERKEEP_IMAGE=from/committed\n")
    listed = {"LAYERKEEP_ENV_FILES": "layerkeep.env, ci/layerkeep.env, missing.env"}
    settings = load(tmp_path, listed)
    assert settings.image == ImageRef("from/ci")
    assert settings.env_files == (tmp_path / "layerkeep.env", tmp_path / "ci" / "layerkeep.env")
    assert "LAYERKEEP_ENV_FILES" not in settings.origins
    assert load(tmp_path, {"LAYERKEEP_ENV_FILES": ""}).image is None
    # Without the variable: the default list, which reads .env too.
    assert load(tmp_path).env_files == (tmp_path / "layerkeep.env", tmp_path / ".env")


def test_env_files_cannot_name_the_env_files(tmp_path: Path) -> None:
    (tmp_path / "layerkeep.env").write_text("LAYERKEEP_ENV_FILES=other.env\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    message = caught.value.one_line()
    assert "LAYERKEEP_ENV_FILES is read from the process environment only" in message
    assert f"{tmp_path / 'layerkeep.env'}:1" in message


def test_flags_resolve_what_derives_from_them(tmp_path: Path) -> None:
    settings = load(tmp_path, {"LAYERKEEP_SERVICES": "postgres"})
    default_env = {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "layerkeep"}
    assert settings.services[0].env == default_env
    flags = {"db_password": "hunter2-long", "services": "postgres,redis"}
    flagged = settings.with_flags(**flags)
    postgres, redis = flagged.services
    assert postgres.env == {"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "hunter2-long"}
    assert redis.kind == "redis"
    assert flagged.test_env == {"DATABASE_URL": "{postgres.url}", "REDIS_URL": "{redis.url}"}
    assert "hunter2-long" in flagged.secret_values
    assert flagged.origins == {**flagged.origins, "LAYERKEEP_DB_PASSWORD": "flag --db-password"}
    assert (flagged.build_id, flagged.project) == (settings.build_id, settings.project)
    with pytest.raises(ConfigError) as caught:
        settings.with_flags(bulder="legacy")
    assert "unknown setting LAYERKEEP_BULDER (from flag --bulder)" in caught.value.one_line()


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


def test_variables_take_the_process_environment_first(tmp_path: Path) -> None:
    (tmp_path / "layerkeep.env").write_text("ORG=committed\nTAG=v1\n")
    (tmp_path / ".env").write_text(
        "ORG=acme\nLAYERKEEP_IMAGE=${ORG}/app:${TAG}\nLAYERKEEP_PROJECT=${NOPE:-fallback}\n"
    )
    assert load(tmp_path).image == ImageRef("acme/app", "v1")
    settings = load(tmp_path, {"ORG": "from-environment"})
    assert settings.image == ImageRef("from-environment/app", "v1")
    assert settings.project == "fallback"


def test_non_utf8_byte_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"LAYERKEEP_IMAGE=app\n# caf\xe9\nX=1\n")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    message = caught.value.one_line()
    assert f"{tmp_path / '.env'}:2" in message
    assert "not UTF-8" in message
    assert "save the file as UTF-8" in message


def test_byte_order_mark_and_unreadable_env_files(tmp_path: Path) -> None:
    (tmp_path / ".env").write_bytes(b"\xef\xbb\xbfLAYERKEEP_IMAGE=app\n")
    assert load(tmp_path).image == ImageRef("app")
    (tmp_path / ".env.local").mkdir()
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert f"{tmp_path / '.env.local'}: cannot read it" in caught.value.one_line()


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
        ("LAYERKEEP_CACHE_LEVEL", "\u00b2", "whole number from 1 to 19"),
        ("LAYERKEEP_SWEEP_AFTER", "9" * 5000, "whole number from 0 to 10000000"),
        ("LAYERKEEP_IMAGE", "app:café", "Docker reference"),
        ("LAYERKEEP_SECRETS", "SECRET_KEY,not a name", "variable names"),
        ("LAYERKEEP_DOCKER_TIMEOUT", "0", "whole number from 1 to 3600"),
        ("LAYERKEEP_BUILD_ARGS", "A=1,oops", "item 2 is not NAME=value"),
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


def test_errors_never_show_values_that_may_be_secrets(tmp_path: Path) -> None:
    cases = [
        ({"LAYERKEEP_TEST_ENV": "DEBUG=0,SECRET_KEY hunter2"}, "LAYERKEEP_TEST_ENV=****"),
        ({"LAYERKEEP_SERVICES": "redis", "LAYERKEEP_REDIS_ENV": "REDIS_PASSWORD hunter2"},
         "LAYERKEEP_REDIS_ENV=****"),
        ({"LAYERKEEP_SERVICES": "postgres",
          "LAYERKEEP_TEST_ENV": "SECRET_KEY=hunter2{postgres.uri}"},
         "LAYERKEEP_TEST_ENV: SECRET_KEY (from environment) names {postgres.uri}"),
    ]
    for environ, expected in cases:
        with pytest.raises(ConfigError) as caught:
            load(tmp_path, environ)
        assert "hunter2" not in caught.value.one_line(), environ
        assert expected in caught.value.one_line()
    (tmp_path / ".env").write_text('SECRET_KEY="hunter2\n')
    with pytest.raises(ConfigError) as caught:
        load(tmp_path)
    assert "hunter2" not in caught.value.one_line()
    assert "line 1 is not KEY=VALUE: 'SECRET_KEY=...'" in caught.value.one_line()


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


def test_the_settings_reference_is_made_from_the_declarations() -> None:
    written = (REPO / "docs" / "settings.md").read_text(encoding="utf-8")
    assert written == reference(), (
        "docs/settings.md is out of date with the settings' declarations: run "
        f"`{REFERENCE_COMMAND}` and commit it"
    )
    for key in KEYS:
        assert f"| `{key.name}` |" in written
    sections = [key.section for key in KEYS]
    assert sections[0], "the first setting opens a section (heading=)"
    # Each section in one run of declarations, so that the reference shows it once.
    runs = [section for i, section in enumerate(sections) if i == 0 or sections[i - 1] != section]
    assert len(runs) == len(set(runs))


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


CIRCLE = {"CIRCLECI": "true", "CIRCLE_BUILD_NUM": "42",
          "CIRCLE_WORKFLOW_JOB_ID": "3f1c9a2e-8d7b-4c55-9a1e-0b6f2d4e8c11"}
GITHUB = {"GITHUB_ACTIONS": "true", "GITHUB_RUN_ID": "8812345678", "GITHUB_RUN_ATTEMPT": "1",
          "GITHUB_JOB": "test", "RUNNER_NAME": "GitHub Actions 12"}


def test_circleci_build_ids_differ_per_job_and_parallel_node() -> None:
    assert detect(CIRCLE).build_id == "3f1c9a2e-8d7b-4c55-9a1e-0b6f2d4e8c11"
    nodes = {detect({**CIRCLE, "CIRCLE_NODE_TOTAL": "3", "CIRCLE_NODE_INDEX": str(index)}).build_id
             for index in range(3)}
    assert nodes == {f"3f1c9a2e-8d7b-4c55-9a1e-0b6f2d4e8c11-{index}" for index in range(3)}
    assert detect({**CIRCLE, "CIRCLE_NODE_TOTAL": "1", "CIRCLE_NODE_INDEX": "0"}).build_id == (
        "3f1c9a2e-8d7b-4c55-9a1e-0b6f2d4e8c11")


def test_github_build_ids_differ_per_attempt_job_and_concurrent_matrix_leg() -> None:
    first = detect(GITHUB).build_id
    assert first.startswith("8812345678-1-test-")
    assert len(first) == len("8812345678-1-test-") + 8
    rerun = detect({**GITHUB, "GITHUB_RUN_ATTEMPT": "2"}).build_id
    other_job = detect({**GITHUB, "GITHUB_JOB": "lint"}).build_id
    # Two legs of one matrix running at once run on two runners.
    other_leg = detect({**GITHUB, "RUNNER_NAME": "GitHub Actions 13"}).build_id
    assert len({first, rerun, other_job, other_leg}) == 4
    assert detect({**GITHUB, "RUNNER_NAME": ""}).build_id == "8812345678-1-test"


def test_gitlab_build_id_is_the_job_id() -> None:
    assert detect({"GITLAB_CI": "true", "CI_JOB_ID": "1234567"}).build_id == "1234567"


@pytest.mark.parametrize("text", ["pr/12", "feature a", "Feature/A", "café", "-x-", "a" * 100, "/"])
def test_build_ids_are_safe_in_container_names(text: str, tmp_path: Path) -> None:
    safe = safe_build_id(text)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", safe), safe
    assert safe != text
    assert safe_build_id(safe) == safe
    assert load(tmp_path, {"LAYERKEEP_BUILD_ID": text}).build_id == safe
    github = detect({**GITHUB, "GITHUB_JOB": text}).build_id
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", github), github


def test_build_ids_that_differ_only_in_replaced_characters_stay_apart() -> None:
    ids = {safe_build_id(text) for text in ("pr/12", "pr:12", "pr 12", "pr-12", "PR/12")}
    assert len(ids) == 5
    assert safe_build_id("run-7.1_a") == "run-7.1_a"


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
        ({"LAYERKEEP_TEST_MOUNTS": "tests:app/tests"}, "host-path:/container/path"),
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


def test_each_setting_is_declared_once_on_its_field() -> None:
    by_field = {key.field: key for key in KEYS}
    settings_fields = {f.name: f for f in fields(Settings)}
    assert set(by_field) <= set(settings_fields)
    assert set(settings_fields) - set(by_field) == {
        "project_dir", "secret_values", "env_files", "origins", "_inputs"}
    assert [key.name for key in KEYS] == [f"LAYERKEEP_{name.upper()}" for name in by_field]
    for key in KEYS:
        assert key.doc.strip(), key.name
        assert "\n" not in key.doc, key.name
    assert {key.name for key in KEYS if key.secret} == {
        "LAYERKEEP_DB_PASSWORD", "LAYERKEEP_REGISTRY_PASSWORD"}


def test_a_secret_setting_is_kept_out_of_repr_as_well_as_out_of_listings(
    tmp_path: Path,
) -> None:
    # The public default password is no secret value, yet it is a secret setting.
    shown = repr(load(tmp_path))
    assert "layerkeep-cache" in shown
    assert "db_password" not in shown
    assert "registry_password" not in shown


def test_cache_dir_may_be_absolute_and_mounts_may_be_files(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "cache"
    project = tmp_path / "project"
    project.mkdir()
    settings = load(project, {
        "LAYERKEEP_CACHE_DIR": str(elsewhere),
        "LAYERKEEP_TEST_MOUNTS": "setup.cfg:/app/setup.cfg:ro",
    })
    assert settings.cache_dir == elsewhere
    assert [(m.source, m.target, m.read_only) for m in settings.test_mounts] == [
        (project / "setup.cfg", "/app/setup.cfg", True)]


def test_secret_values(tmp_path: Path) -> None:
    (tmp_path / "layerkeep.env").write_text(
        "LAYERKEEP_SERVICES=postgres,redis\n"
        "LAYERKEEP_SECRETS=STRIPE,FROM_CI\n"
        "LAYERKEEP_TEST_ENV=SECRET_KEY=django-insecure-x1,API_TOKEN=tok-123,"
        "STRIPE=sk_live_9,DEBUG=0,DATABASE_URL={postgres.url},EMPTY_PASSWORD=\n"
        "LAYERKEEP_REDIS_ENV=REDIS_PASSWORD=redis-pw\n"
        "LAYERKEEP_BUILD_ARGS=PIP_INDEX_TOKEN=pip-tok,PYTHON=3.11\n"
    )
    settings = load(tmp_path, {"FROM_CI": "ci-secret", "UNLISTED_TOKEN": "not-ours"})
    assert set(settings.secret_values) == {
        "django-insecure-x1", "tok-123", "sk_live_9", "redis-pw", "pip-tok", "ci-secret"}
    lengths = [len(value) for value in settings.secret_values]
    assert lengths == sorted(lengths, reverse=True)
    # The built-in database password is public; masking it would mask "layerkeep" everywhere.
    assert "layerkeep" not in settings.secret_values
    assert "sk_live_9" not in repr(settings)
    chosen = load(tmp_path, {"LAYERKEEP_DB_PASSWORD": "pg-pw", "LAYERKEEP_REGISTRY_PASSWORD": "r"})
    assert {"pg-pw", "r"} <= set(chosen.secret_values)
    assert "pg-pw" not in repr(chosen)


def test_describe_settings_lists_every_setting_masked_with_its_origin(tmp_path: Path) -> None:
    (tmp_path / "layerkeep.env").write_text(
        "LAYERKEEP_IMAGE=myorg/app\n"
        "LAYERKEEP_SERVICES=postgres\n"
        "LAYERKEEP_DB_PASSWORD=pg-secret-1\n"
        "LAYERKEEP_SECRETS=STRIPE\n"
        "LAYERKEEP_TEST_ENV=SECRET_KEY=dj-1,STRIPE=sk_9,DEBUG=0,URL={postgres.url}\n"
        "LAYERKEEP_TEST_SETUP=echo sk_9 > /tmp/key\n"
    )
    settings = load(tmp_path, {"LAYERKEEP_REGISTRY_PASSWORD": "reg-pw", "GITLAB_CI": "true",
                               "CI_JOB_ID": "77"}).with_flags(builder="legacy")
    rows = {row.name: row for row in describe_settings(settings)}
    assert list(rows)[: len(KEYS)] == [key.name for key in KEYS]
    assert rows["LAYERKEEP_IMAGE"][1:3] == ("myorg/app:latest", f"{tmp_path / 'layerkeep.env'}:1")
    assert rows["LAYERKEEP_BUILDER"][1:3] == ("legacy", "flag --builder")
    assert rows["LAYERKEEP_BUILD_ID"][1:3] == ("77", "default (CI variables)")
    assert rows["LAYERKEEP_PROJECT"][1:3] == (tmp_path.name, "default (the folder's name)")
    assert rows["LAYERKEEP_CONTEXT"][1:3] == (str(tmp_path), "default")
    assert rows["LAYERKEEP_DB_PASSWORD"].value == MASK
    assert rows["LAYERKEEP_REGISTRY_PASSWORD"][1:3] == (MASK, "environment")
    assert rows["LAYERKEEP_TEST_ENV"].value == (
        f"SECRET_KEY={MASK},STRIPE={MASK},DEBUG=0,URL={{postgres.url}}")
    assert rows["LAYERKEEP_TEST_SETUP"].value == f"echo {MASK} > /tmp/key"
    assert rows["LAYERKEEP_SERVICES"].value == "postgres"
    assert rows["LAYERKEEP_KEEP_SERVICES"].value == "no"
    assert rows["LAYERKEEP_POSTGRES_IMAGE"][1:3] == ("postgres:15", "default")
    postgres_env = rows["LAYERKEEP_POSTGRES_ENV"].value
    assert postgres_env == f"POSTGRES_USER=postgres,POSTGRES_PASSWORD={MASK}"
    assert rows["LAYERKEEP_POSTGRES_TIMEOUT"].value == "60"
    assert "LAYERKEEP_REDIS_IMAGE" not in rows
    printed = "\n".join(" ".join(row) for row in rows.values())
    for secret in ("pg-secret-1", "reg-pw", "dj-1", "sk_9"):
        assert secret not in printed
    assert all(row.doc for row in rows.values())
