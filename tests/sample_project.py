"""The small multi-stage project the cache tests build (local folder or registry backend).

Two stages, a 3 MB layer of random bytes, sleeps that make a cold build visible, and a
base image that is the project's own tag, so a "fresh machine" can lack it too.

With ``unique_base`` that base is ``debian:bookworm-slim`` plus a layer holding a fresh
uuid, built first: its layers are new, so no build step cached by another test or run on
a shared engine can match, and a cold build is cold without pruning anything. (A label
alone is not enough: BuildKit keys a local base image by its layers, not its id.)
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from layerkeep.building.builder import choose_builder
from layerkeep.building.image import BuildReport, build_image
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine
from layerkeep.core.settings import Settings, load_settings

DOCKERFILE = """\
FROM {base} AS deps
RUN sleep 2 && mkdir /deps && head -c 3000000 /dev/urandom > /deps/blob
RUN echo two > /deps/two

FROM {base} AS final
COPY --from=deps /deps /deps
WORKDIR /app
COPY src /app/src
RUN sleep 1 && cat /app/src/main.txt > /app/out.txt
CMD ["cat", "/app/out.txt"]
"""


def make_project(
    root: Path, repository: str, engine: Engine, *, unique_base: bool = False
) -> Settings:
    """Write the project into ``root`` with images under ``repository``; its settings."""
    base = f"{repository}-base:1"
    if unique_base:
        with tempfile.TemporaryDirectory(prefix="layerkeep-base-") as folder:
            (Path(folder) / "id").write_text(f"{uuid.uuid4()}\n")
            (Path(folder) / "Dockerfile").write_text(
                "FROM debian:bookworm-slim\nCOPY id /layerkeep-test-id\n"
            )
            engine.build(Path(folder), tag=base)
    else:
        engine.api.tag("debian:bookworm-slim", f"{repository}-base", "1")
    (root / "src").mkdir(parents=True)
    (root / "src" / "main.txt").write_text("hello\n")
    (root / "Dockerfile").write_text(DOCKERFILE.format(base=base))
    (root / ".env").write_text(
        f"LAYERKEEP_IMAGE={repository}/app\nLAYERKEEP_CACHE_IMAGES={base}\n"
        "LAYERKEEP_CACHE_DIR=cache\n"
    )
    return load_settings(root, {}, git_facts=lambda _: GitFacts("", ""))


def build(
    engine: Engine, settings: Settings, kind: str, environ: Mapping[str, str] = os.environ
) -> BuildReport:
    """Build with the named builder (legacy or buildkit), quietly; ``environ`` reaches the
    engine (another engine's DOCKER_HOST)."""
    builder = choose_builder(kind, environ, engine=engine)
    return build_image(engine, settings, builder, environ, log=lambda _: None)
