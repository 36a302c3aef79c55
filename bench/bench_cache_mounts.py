"""The dependency step after adding one package, on a wiped engine: pip cache mount kept or not.

    python bench/bench_cache_mounts.py [--kind buildkit-20.10|26-classic|26-containerd]

On a private throw-away engine (tests/second_engine.py: ``docker builder prune`` is
global), a project whose Dockerfile installs its requirements with
``RUN --mount=type=cache,target=/root/.cache/pip pip install -r requirements.txt``:

1. cold: build, then save the cache mounts (dir backend);
2. one package added, engine wiped (images removed, builder pruned), cache mounts
   restored, build: pip should say "Using cached" for every old wheel;
3. the same on a wiped engine without restoring the mounts.

The images' own cache is left out: the changed requirements file makes the step run
either way, and the steps before it are a second or two.

Prints the export and import times and sizes of the pip cache, the dependency step's
time in 2 and 3 and their ratio, and pip's "Using cached" count; asserts nothing but that
the builds work.

pip keeps a download in its cache only when the response allows it: PyPI's file host
marks every file ``Cache-Control: max-age=365000000, immutable, public``. Where a TLS
proxy strips those headers (this project's CI machines), pip caches nothing and no cache
mount can help; so pip reaches PyPI through a small front on the engine's bridge
address that fetches from PyPI over the host's TLS and gives each file those headers
back (``--pypi direct`` skips it, for machines that reach PyPI unaltered).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from second_engine import SecondEngine, ensure_docker26, second_engine, transfer_images  # noqa: E402

from layerkeep.building.builder import Builder, choose_builder  # noqa: E402
from layerkeep.building.image import build_image  # noqa: E402
from layerkeep.cache.mount_folder import MountStore  # noqa: E402
from layerkeep.cache.mount_store import restore_cache_mounts, save_cache_mounts  # noqa: E402
from layerkeep.core.ci_vars import GitFacts  # noqa: E402
from layerkeep.core.engine import Engine, connect  # noqa: E402
from layerkeep.core.settings import Settings, load_settings  # noqa: E402

BASE = "python:3.11-slim"
IMAGE = "layerkeep-bench/mounts"
# Wheels only, about 110 MB of downloads; then one small package is added.
PACKAGES = ["numpy==1.26.4", "pandas==2.2.2", "scipy==1.13.1", "pyarrow==16.1.0"]
ADDED = "tabulate==0.9.0"
DOCKERFILE = """\
FROM python:3.11-slim
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_TRUSTED_HOST=
WORKDIR /app
COPY requirements.txt .
RUN --mount=type=cache,target=/root/.cache/pip \\
    pip install --progress-bar off -r requirements.txt
"""
UPSTREAM = {"/simple/": "https://pypi.org/simple/", "/files/": "https://files.pythonhosted.org/"}
IMMUTABLE = "max-age=365000000, immutable, public"


class _Front(BaseHTTPRequestHandler):
    """GET /simple/... and /files/... from PyPI; file links rewritten to come back here."""

    files_bytes = 0  # what pip fetched from PyPI's file host, all runs together

    def do_GET(self) -> None:
        prefix = next((p for p in UPSTREAM if self.path.startswith(p)), None)
        if prefix is None:
            self.send_error(404)
            return
        request = urllib.request.Request(  # noqa: S310 - an https URL of PyPI
            UPSTREAM[prefix] + self.path.removeprefix(prefix),
            headers={"Accept": self.headers.get("Accept", "*/*")},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310 - PyPI
            body = answer.read()
            kind = answer.headers.get("Content-Type", "application/octet-stream")
        if prefix == "/simple/":
            here = f"http://{self.headers['Host']}/files/".encode()
            body = body.replace(UPSTREAM["/files/"].encode(), here)
        if prefix == "/files/":
            type(self).files_bytes += len(body)
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", IMMUTABLE if prefix == "/files/" else "max-age=0")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@contextlib.contextmanager
def pypi_front(address: str) -> Iterator[str]:
    """The front listening on ``address``; its index URL."""
    server = ThreadingHTTPServer((address, 0), _Front)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{address}:{server.server_address[1]}/simple"
    finally:
        server.shutdown()
        server.server_close()
STEP = re.compile(r"^(#\d+) \[.*\] RUN .*pip install")


def quiet(_: str) -> None:
    pass


def settings_for(project: Path, second: SecondEngine, index: str, *, mounts: bool) -> Settings:
    host = index.split("/")[2].split(":", maxsplit=1)[0]
    environ = {
        **second.environ,
        "LAYERKEEP_BUILD_ARGS": f"PIP_INDEX_URL={index},PIP_TRUSTED_HOST={host}",
        "LAYERKEEP_IMAGE": IMAGE,
        "LAYERKEEP_BUILDER": "buildkit",
        "LAYERKEEP_CACHE_DIR": str(project.parent / "cache"),
        "LAYERKEEP_CACHE_MOUNTS": "yes" if mounts else "no",
    }
    return load_settings(project, environ, git_facts=lambda _: GitFacts("", ""))


def wipe(second: SecondEngine, engine: Engine) -> None:
    for tag in (f"{IMAGE}:latest",):
        image_id = engine.image_id(tag)
        if image_id is not None:
            engine.remove_image(image_id, force=True)
    second.prune_builder()


def build(engine: Engine, settings: Settings, builder: Builder, environ: dict[str, str]) -> tuple[
    float, int
]:
    """Build; the pip step's seconds (BuildKit's own figure) and its "Using cached" lines."""
    lines: list[str] = []
    build_image(engine, settings, builder, environ, log=lines.append)
    step = next(match[1] for line in lines if (match := STEP.match(line)))
    done = next(line for line in lines if line.startswith(f"{step} DONE "))
    cached = sum(1 for line in lines if line.startswith(step) and "Using cached" in line)
    return float(done.split()[-1].rstrip("s")), cached


def bench(kind: str, folder: Path, *, front: bool) -> None:
    docker26 = ensure_docker26() if kind.startswith("26") else None
    with contextlib.ExitStack() as stack:
        second = stack.enter_context(
            second_engine(folder / "engine", docker26=docker26,
                          containerd_store=kind == "26-containerd")
        )
        transfer_images(os.environ, second.environ, [BASE])
        engine = stack.enter_context(connect(second.environ, labels={"io.layerkeep.bench": "1"}))
        environ = dict(second.environ)
        index = UPSTREAM["/simple/"].rstrip("/")
        if front:
            index = stack.enter_context(pypi_front(second.bridge_address.split("/")[0]))
        builder = choose_builder("buildkit", environ, engine=engine)
        project = folder / "project"
        project.mkdir()
        (project / "Dockerfile").write_text(DOCKERFILE)
        requirements = project / "requirements.txt"
        requirements.write_text("\n".join(PACKAGES) + "\n")
        kept = settings_for(project, second, index, mounts=True)

        cold_seconds, _ = build(engine, kept, builder, environ)
        exported = save_cache_mounts(engine, kept, builder, environ, log=quiet)
        stored = sum(
            (kept.cache_dir / "mounts" / entry.file).stat().st_size
            for entry in MountStore(kept.cache_dir).read_index().values()
        )
        requirements.write_text("\n".join([*PACKAGES, ADDED]) + "\n")

        wipe(second, engine)
        imported = restore_cache_mounts(engine, kept, builder, environ, log=quiet)
        fetched = _Front.files_bytes
        with_mounts, cached_with = build(engine, kept, builder, environ)
        fetched_with = _Front.files_bytes - fetched

        wipe(second, engine)
        without = settings_for(project, second, index, mounts=False)
        fetched = _Front.files_bytes
        without_mounts, cached_without = build(engine, without, builder, environ)
        fetched_without = _Front.files_bytes - fetched
        wipe(second, engine)
    print(
        f"[{kind}] cold pip step {cold_seconds:.1f} s; pip cache "
        f"{exported.bytes / 1e6:.0f} MB ({stored / 1e6:.0f} MB zstd): "
        f"export {exported.seconds:.1f} s, import {imported.seconds:.1f} s\n"
        f"[{kind}] one package added, wiped engine: pip step {with_mounts:.1f} s with the "
        f"mounts restored ({cached_with} 'Using cached'), {without_mounts:.1f} s without "
        f"({cached_without}); with/without = {with_mounts / without_mounts:.2f}"
        + (f"; downloaded from PyPI: {fetched_with / 1e6:.1f} MB with, "
           f"{fetched_without / 1e6:.1f} MB without" if front else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--kind", choices=["buildkit-20.10", "26-classic", "26-containerd"],
        default="buildkit-20.10",
    )
    parser.add_argument("--pypi", choices=["front", "direct"], default="front")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="layerkeep-bench-") as folder:
        bench(args.kind, Path(folder), front=args.pypi == "front")


if __name__ == "__main__":
    main()
