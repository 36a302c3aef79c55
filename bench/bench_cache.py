"""Cold vs cache-restored builds, and save/load of a large image, on the real engine.

    python bench/bench_cache.py [--builder legacy|buildkit|both] [--large postgres:15]

Prints figures (seconds, MB, steps reused, ratios against the cold build of the same
run); asserts nothing. Needs the stand-in or official `python:3.11-slim` image.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from pathlib import Path

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.builder import choose_builder
from layerkeep.building.image import build_image
from layerkeep.cache.layer_load import load_images
from layerkeep.cache.layer_save import save_images
from layerkeep.cache.store import CacheDir
from layerkeep.core.engine import Engine, connect
from layerkeep.core.settings import Settings, load_settings

DOCKERFILE = """\
FROM python:3.11-slim AS builder
RUN python3 -m venv /venv
COPY requirements.txt /tmp/requirements.txt
RUN /venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

FROM python:3.11-slim
COPY --from=builder /venv /venv
WORKDIR /app
COPY app.py /app/
CMD ["/venv/bin/python", "/app/app.py"]
"""
REQUIREMENTS = "flask==3.0.3\nrequests==2.32.3\npsycopg[binary]==3.2.3\nredis==5.0.8\n"


def quiet(_: str) -> None:
    pass


def make_project(root: Path) -> Settings:
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "requirements.txt").write_text(REQUIREMENTS)
    (root / "app.py").write_text("print('hello')\n")
    image = f"layerkeep-bench/{uuid.uuid4().hex[:8]}"
    (root / ".env").write_text(f"LAYERKEEP_IMAGE={image}\nLAYERKEEP_CACHE_DIR=cache\n")
    return load_settings(root, {})


def wipe(engine: Engine, settings: Settings) -> None:
    for image in images_to_cache(settings):
        if engine.image_id(image):
            engine.api.remove_image(image, force=True)
    engine.api.prune_builds(all=True)


def timed_build(engine: Engine, settings: Settings, kind: str) -> tuple[float, int, int]:
    builder = choose_builder(kind, os.environ, engine=engine)
    started = time.monotonic()
    report = build_image(engine, settings, builder, os.environ, log=quiet)
    return time.monotonic() - started, report.tally.reused, report.tally.total


def bench_builder(engine: Engine, kind: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        settings = make_project(Path(folder))
        cache = CacheDir(settings.cache_dir)
        try:
            wipe(engine, settings)
            cold, _, total = timed_build(engine, settings, kind)
            save = save_images(engine, cache, images_to_cache(settings), log=quiet)
            size = sum(p.stat().st_size for p in (cache.root / "blobs").iterdir())
            wipe(engine, settings)
            load = load_images(engine, cache, log=quiet)
            warm, reused, warm_total = timed_build(engine, settings, kind)
            print(f"[{kind}] cold build {cold:.1f} s ({total} steps)")
            print(f"[{kind}] save {save.seconds:.1f} s, cache {size / 1e6:.1f} MB on disk")
            print(f"[{kind}] load {load.seconds:.1f} s ({load.bytes_read / 1e6:.1f} MB read)")
            print(
                f"[{kind}] restored build {warm:.1f} s, {reused}/{warm_total} steps reused; "
                f"cold/restored = {cold / max(warm, 0.01):.1f}x; "
                f"load+restored build = {(load.seconds + warm) / cold:.2f} of cold"
            )
        finally:
            wipe(engine, settings)


def bench_large(engine: Engine, image: str) -> None:
    if engine.image_id(image) is None:
        print(f"[large] {image} not in the engine, skipped")
        return
    size = int((engine.image_attrs(image) or {}).get("Size", 0))
    with tempfile.TemporaryDirectory() as folder:
        cache = CacheDir(Path(folder))
        save = save_images(engine, cache, [image], log=quiet)
        stored = sum(p.stat().st_size for p in (cache.root / "blobs").iterdir())
        again = save_images(engine, cache, [image], log=quiet)
        present = load_images(engine, cache, log=quiet)
        print(
            f"[large] {image}: {size / 1e6:.0f} MB image, save {save.seconds:.1f} s "
            f"-> {stored / 1e6:.0f} MB on disk ({stored / max(size, 1):.2f} of raw); "
            f"unchanged save {again.seconds * 1000:.0f} ms; "
            f"load while present {present.seconds * 1000:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--builder", choices=["legacy", "buildkit", "both"], default="both")
    parser.add_argument("--large", default="postgres:15", help="large image to save and load")
    args = parser.parse_args()
    engine = connect(os.environ, labels={})
    for kind in ["legacy", "buildkit"] if args.builder == "both" else [args.builder]:
        bench_builder(engine, kind)
    bench_large(engine, args.large)


if __name__ == "__main__":
    main()
