"""Dockerfile stages, builder output, tar streams, numbers and references: pure parsers."""

from __future__ import annotations

import io
import tarfile

import pytest

from layerkeep.building.dockerfile import (
    directives,
    expand,
    instructions,
    parse_dockerfile,
    read_stages,
    root_stage,
)
from layerkeep.building.output import BuildkitParser, LegacyParser, StepTally
from layerkeep.core.imageref import is_valid_tag, parse_image_ref
from layerkeep.core.tarstream import Entry, reader_over, write_tar
from layerkeep.core.values import Invalid, parse_number, parse_port, parse_whole_number

MULTI_STAGE = """\
# syntax=docker/dockerfile:1
ARG BASE=python:3.11-slim
FROM --platform=linux/amd64 ${BASE} AS Builder
RUN pip install \\
    # a comment inside a continuation
    flask
from builder as tests
FROM python:3.11-slim
COPY --from=builder /venv /venv
"""


def test_stages_names_and_bases() -> None:
    stages = read_stages(MULTI_STAGE)
    assert [(s.index, s.name, s.base) for s in stages] == [
        (0, "builder", "${BASE}"),
        (1, "tests", "builder"),
        (2, None, "python:3.11-slim"),
    ]


def test_continuations_join_and_skip_comments() -> None:
    lines = instructions(MULTI_STAGE)
    assert lines[2].split() == ["RUN", "pip", "install", "flask"]
    assert len(lines) == 6
    assert not any(line.startswith("#") for line in lines)


def test_escape_directive() -> None:
    text = "# escape=`\nFROM base AS a\nRUN echo `\n  hi\nFROM a\n"
    assert instructions(text)[1].split() == ["RUN", "echo", "hi"]
    assert [s.name for s in read_stages(text)] == ["a", None]


def test_directives_are_read_only_atop_the_file() -> None:
    text = "# Syntax=docker/dockerfile:1\n#escape = `\n# a comment\nFROM a\n# late=1\n"
    assert directives(text) == {"syntax": "docker/dockerfile:1", "escape": "`"}


def test_instructions_parts_args_and_stage_references() -> None:
    parsed = parse_dockerfile(
        'ARG BASE="python:3.11-slim" TOOL\n'
        "FROM ${BASE} AS deps\n"
        "RUN --mount=type=cache,target=/root/.cache,id=pip --mount=type=secret,id=t \\\n"
        "    pip   install x\n"
        'COPY --from=deps --chown=1:1 ["a","b c","/dst/"]\n'
        "ADD src/ lib/ /app/\n"
        "FROM deps AS app\n"
        "ARG TOOL=make\n"
        "FROM app\n"
    )
    assert parsed.global_args == {"BASE": "python:3.11-slim", "TOOL": None}
    deps, app, final = parsed.stages
    run, copy, add = deps.instructions[1:]
    assert run.text.endswith("id=t pip install x")
    assert (run.keyword, run.args) == ("RUN", "pip install x")
    assert run.mounts() == [
        {"type": "cache", "target": "/root/.cache", "id": "pip"},
        {"type": "secret", "id": "t"},
    ]
    assert (copy.flag("from"), copy.flag("chown"), copy.sources()) == ("deps", "1:1", ["a", "b c"])
    assert (add.flag("from"), add.sources(), add.mounts()) == (None, ["src/", "lib/"], [])
    assert app.instructions[1].declared() == {"TOOL": "make"}
    assert root_stage(parsed.stages, final.index) == deps
    assert expand(deps.base, parsed.global_args) == "python:3.11-slim"
    assert expand("$TOOL:${BASE}", parsed.global_args) == "$TOOL:python:3.11-slim"


def test_legacy_tally_counts_first_sightings_and_skips_from() -> None:
    tally = StepTally()
    stage_build = LegacyParser(tally)
    for line in [
        "Step 1/3 : FROM base AS deps",
        "Step 2/3 : RUN make deps",
        " ---> Using cache",
        " ---> 1234",
        "Step 3/3 : RUN make more",
        " ---> Running in abc",
    ]:
        stage_build.feed(line)
    stage_build.finish()
    final_build = LegacyParser(tally)
    for line in [
        "Step 1/5 : FROM base AS deps",
        "Step 2/5 : RUN make deps",
        " ---> Using cache",
        "Step 3/5 : RUN make more",
        " ---> Using cache",
        "Step 4/5 : FROM base",
        "Step 5/5 : COPY . /app",
        " ---> Using cache",
    ]:
        final_build.feed(line)
    final_build.finish()
    # "RUN make more" ran in the stage build: its cached re-run in the final build is not a hit.
    assert (tally.reused, tally.total) == (2, 3)
    assert tally.summary() == "cache: 2/3 steps reused"


def test_same_instruction_in_two_stages_counts_twice() -> None:
    tally = StepTally()
    parser = LegacyParser(tally)
    for line in ["Step 1/4 : FROM a", "Step 2/4 : RUN x", "Step 3/4 : FROM b", "Step 4/4 : RUN x"]:
        parser.feed(line)
    parser.finish()
    assert tally.total == 2


def test_buildkit_tally() -> None:
    tally = StepTally()
    parser = BuildkitParser(tally)
    for line in [
        "#1 [internal] load build definition from Dockerfile",
        "#4 [deps 1/3] FROM docker.io/library/debian:bookworm-slim",
        "#4 CACHED",
        "#5 [deps 2/3] RUN sleep 2",
        "#5 CACHED",
        "#6 [final 2/3] COPY src /src",
        "#6 DONE 0.1s",
        "#7 [final 3/3] RUN make",
        "#7 0.345 compiling",
        "#7 DONE 2.0s",
    ]:
        parser.feed(line)
    parser.finish()
    assert (tally.reused, tally.total) == (1, 3)


def test_buildkit_parser_counts_a_step_skipped_for_a_later_cached_one_as_reused() -> None:
    # Seen on Docker 26 with a registry cache: BuildKit starts the first steps, then
    # finds a later step in the cache and cancels them: nothing of theirs was run.
    tally = StepTally()
    parser = BuildkitParser(tally)
    for line in [
        "#6 [builder 1/3] FROM docker.io/library/python:3.11-slim@sha256:a32e",
        "#6 CANCELED",
        "#8 [builder 2/3] RUN python3 -m venv /venv",
        "#8 CANCELED",
        "#9 [builder 3/3] COPY requirements.txt /tmp/requirements.txt",
        "#9 CACHED",
    ]:
        parser.feed(line)
    parser.finish()
    assert (tally.reused, tally.total) == (2, 2)


def test_a_cached_step_printed_as_done_while_its_layers_are_fetched_counts_as_reused() -> None:
    # BuildKit prints a step as it is when printed: a cached step whose layers it then
    # fetches from a registry cache can lose its CACHED line. Those fetches happen only
    # for results that came from the cache; a step that ran prints its output instead.
    tally = StepTally()
    parser = BuildkitParser(tally)
    for line in [
        "#9 [builder 3/4] COPY requirements.txt /tmp/requirements.txt",
        "#9 CACHED",
        "#11 [builder 4/4] RUN pip install --no-cache-dir -r /tmp/requirements.txt",
        "#11 sha256:a7351e61ee5aa1ac0ed01290113a5c71cd2b5212e27983dff7600df78b5dad9f "
        "130.24kB / 130.24kB 0.0s done",
        "#11 sha256:dc66cf7d9d3dde1ab1cf815b301761d25ae5b45b5424743bb014bcec82c01af1 "
        "26.84MB / 26.84MB 0.2s done",
        "#11 DONE 0.2s",
        "#16 [stage-1 7/8] COPY shortener/ ./shortener/",
        "#16 DONE 0.2s",
        "#17 [stage-1 8/8] RUN echo probe > /tmp/probe && ls /app",
        # Docker 20.10's BuildKit names the step by its digest first.
        "#17 sha256:f88611415cba7b750daf80d81653e1fee7ddc012522d126f6d3b8eb9582200f7",
        "#17 0.119 db",
        "#17 DONE 0.1s",
    ]:
        parser.feed(line)
    parser.finish()
    assert tally.reused_by_key == {
        "builder 3/4:COPY requirements.txt /tmp/requirements.txt": True,
        "builder 4/4:RUN pip install --no-cache-dir -r /tmp/requirements.txt": True,
        "stage-1 7/8:COPY shortener/ ./shortener/": False,
        "stage-1 8/8:RUN echo probe > /tmp/probe && ls /app": False,
    }


def test_write_tar_round_trips_through_tarfile() -> None:
    entries = [
        Entry("manifest.json", 2, [b"[]"]),
        Entry("abc/layer.tar", 1500, [b"x" * 1000, b"y" * 500]),
        Entry("empty/layer.tar", 0, []),
    ]
    data = b"".join(write_tar(entries))
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        names = archive.getnames()
        member = archive.extractfile("abc/layer.tar")
        assert member is not None
        assert member.read() == b"x" * 1000 + b"y" * 500
    assert names == ["manifest.json", "abc/layer.tar", "empty/layer.tar"]


def test_write_tar_refuses_short_content() -> None:
    with pytest.raises(ValueError, match="expected 10 bytes, got 3"):
        b"".join(write_tar([Entry("a", 10, [b"abc"])]))


def test_reader_reads_across_chunks() -> None:
    reader = reader_over([b"ab", b"cde", b"", b"f"])
    assert reader.read(4) == b"abcd"
    assert reader.read(-1) == b"ef"
    assert reader.read(3) == b""


# Escapes: superscript two, Arabic-Indic digits one and two, fullwidth "dev".
@pytest.mark.parametrize(
    "text", ["\u00b2", "\u0661\u0662", "12\n3", "1e3", "0x10", "1_000", "9" * 5000, " ", "-1"]
)
def test_whole_numbers_are_ascii_digits_only(text: str) -> None:
    with pytest.raises(Invalid, match="use a whole number from 1 to 10"):
        parse_whole_number(text, 1, 10)
    with pytest.raises(Invalid, match="port number"):
        parse_port(text if text.strip() else "x")


def test_whole_numbers_and_ports_in_range() -> None:
    assert parse_whole_number(" 7 ", 1, 10) == 7
    assert parse_port("5432") == 5432
    assert parse_port("  ") is None
    assert parse_number("2.5", 1, 3) == 2.5
    for text in ("\u0661", "nan", "inf", "1e1", "\u00b2"):
        with pytest.raises(Invalid, match="use a number from 1 to 3"):
            parse_number(text, 1, 3)


@pytest.mark.parametrize(
    "text", ["app:café", "café/app", "app:\uff44\uff45\uff56", "app\n", "app:dev\n", "app:\u0661"]
)
def test_references_are_ascii_and_whole(text: str) -> None:
    assert parse_image_ref(text) is None


def test_tags_are_ascii_and_whole() -> None:
    assert is_valid_tag("v1.2_rc-3")
    assert not is_valid_tag("café")
    assert not is_valid_tag("dev\n")
    assert not is_valid_tag(".hidden")
