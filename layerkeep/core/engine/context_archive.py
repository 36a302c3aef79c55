"""The build context as the classic builder gets it: a tar of what the ignore rules leave.

Made with docker-py's own ``.dockerignore`` matcher, so what a build sees and what
layerkeep lists (:func:`context_files`) agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import IO

import docker.api.build
import docker.utils.build


def read_ignore_file(path: Path) -> list[str]:
    """The patterns of an ignore file, in order; none when there is no such file."""
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def context_files(context: Path, rules: Sequence[str]) -> list[str]:
    """Paths (files and folders, ``/``-separated, relative) a build sees in ``context``.

    ``rules`` are .dockerignore patterns in order, matched by docker-py's matcher (the one
    the context tar uses). Unlike the tar, the Dockerfile is not put back: a builder
    drops an ignored Dockerfile from what COPY can read.
    """
    walked = docker.utils.build.PatternMatcher(list(rules)).walk(str(context))
    return sorted(walked)


def context_archive(
    context: Path, dockerfile: str | None, exclude: Sequence[str]
) -> tuple[str | None, IO[bytes]]:
    """The context tar docker-py would send, minus ``exclude``; and the Dockerfile's name in it.

    docker-py has no parameter for extra patterns, so this does what ``api.build(path=...)``
    does (same .dockerignore reading, same matcher, a Dockerfile outside the context added
    under a generated name) with the patterns appended: later patterns win.
    """
    rules = read_ignore_file(context / ".dockerignore")
    name, contents = docker.api.build.process_dockerfile(dockerfile, str(context))
    archive = docker.utils.build.tar(
        str(context), exclude=[*rules, *exclude], dockerfile=(name, contents)
    )
    return name, archive
