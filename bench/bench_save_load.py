"""cache.save and cache.load against the engine's own floors, measured in the same run.

    python bench/bench_save_load.py [--runs 3] [--threads 0] [--level 3] [--example]

Builds a test image of over 500 MB (a ~460 MB layer of real binaries: /usr of the
postgres stand-in and /usr/lib of the python one, over debian:bookworm-slim), then,
interleaved over ``--runs`` rounds, prints:

- full save into an empty cache vs `docker save IMAGE | zstd -T0 -3` and raw `docker save -o`
- the CI case, one small new layer on the cached image, vs raw `docker save -o`
- load with the image absent (its base present) vs raw `docker load -i` of its save
- peak RSS of a process running the full save (its own getrusage)
- an unchanged save, and one of an image whose config differs only in BuildKit's inline
  cache (what a fully cached BuildKit rebuild gives)

With ``--example``, the bundled example too: its full save vs the floors, and the save
after an unchanged rebuild under each builder. Prints figures; asserts nothing. Needs
the stand-in images (`inv standins.build`). Measure on a quiet machine: the figures move
with load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from layerkeep.building.build_plan import images_to_cache
from layerkeep.building.builder import choose_builder
from layerkeep.building.image import build_image
from layerkeep.cache.archive import LayerSource, legacy_archive
from layerkeep.cache.layer_load import load_images
from layerkeep.cache.layer_save import SaveReport, save_images
from layerkeep.cache.store import CacheDir
from layerkeep.core.ci_vars import GitFacts
from layerkeep.core.engine import Engine, connect
from layerkeep.core.settings import load_settings

REPO = Path(__file__).resolve().parent.parent
BIG_DOCKERFILE = """\
FROM debian:bookworm-slim AS blob
COPY --from=postgres:15 /usr /x/pg
COPY --from=python:3.11-slim /usr/lib /x/py
FROM debian:bookworm-slim
COPY --from=blob /x /opt/x
"""
# A process of its own, for its peak RSS: VmHWM, its own memory's high-water mark.
# (getrusage's ru_maxrss would do on a fresh process, but Linux carries the parent's
# over an exec after vfork, which is how Python starts it: it showed this bench's own.)
SAVE_SCRIPT = """
import os, sys, time
from pathlib import Path
from layerkeep.cache.layer_save import save_images
from layerkeep.cache.store import CacheDir
from layerkeep.core.engine import connect
started = time.monotonic()
save_images(connect(os.environ, labels={}), CacheDir(Path(sys.argv[1])), sys.argv[4:],
            level=int(sys.argv[2]), threads=int(sys.argv[3]), log=lambda _: None)
status = Path("/proc/self/status").read_text().splitlines()
peak = next(line.split()[1] for line in status if line.startswith("VmHWM"))
print(time.monotonic() - started, peak)
"""
Figures = dict[str, list[float]]


@dataclass(frozen=True)
class Options:
    """How many rounds, and the cache's compression settings."""

    runs: int
    level: int
    threads: int


def quiet(_: str) -> None:
    pass


def save(engine: Engine, cache: CacheDir, images: list[str], opts: Options) -> SaveReport:
    return save_images(engine, cache, images, level=opts.level, threads=opts.threads, log=quiet)


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def shell(command: str) -> None:
    subprocess.run(command, shell=True, check=True)  # noqa: S602 - our own fixed commands


def build_big(engine: Engine, folder: Path, tag: str) -> None:
    (folder / "Dockerfile").write_text(BIG_DOCKERFILE)
    engine.build(folder, tag=tag)


def remove(engine: Engine, *tags: str) -> None:
    for tag in tags:
        engine.remove_image(tag, force=True)


def remove_repository(engine: Engine, repository: str) -> None:
    """Every tag of ``repository``: the build's images and the record image beside them."""
    for image in engine.api.images(name=repository):
        remove(engine, *(image.get("RepoTags") or []))


def full_save_round(
    engine: Engine, images: list[str], work: Path, opts: Options, figures: Figures
) -> None:
    """One round of the full save and its two floors, in a rotating order."""
    names = " ".join(images)
    steps: list[tuple[str, Callable[[], object]]] = [
        ("raw docker save -o", lambda: shell(f"docker save -o {work}/raw.tar {names}")),
        (
            "docker save | zstd -T0 -3",
            lambda: shell(f"docker save {names} | zstd -q -T0 -{opts.level} -o {work}/raw.zst"),
        ),
        (
            "cache.save, empty cache",
            lambda: save(engine, CacheDir(work / "full"), images, opts),
        ),
    ]
    shift = len(figures.get("cache.save, empty cache", [])) % len(steps)
    for label, step in steps[shift:] + steps[:shift]:
        figures.setdefault(label, []).append(timed(step))
        shutil.rmtree(work / "full", ignore_errors=True)
        for leftover in ("raw.tar", "raw.zst"):
            (work / leftover).unlink(missing_ok=True)


def summary(title: str, figures: Figures, ours: str, floors: list[str]) -> None:
    print(f"\n{title}")
    for label, values in figures.items():
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {label:34s} median {statistics.median(values):6.2f} s  ({shown})")
    for floor in floors:
        pairs = [o / f for o, f in zip(figures[ours], figures[floor], strict=True)]
        ratio = statistics.median(figures[ours]) / statistics.median(figures[floor])
        print(
            f"  {ours} / {floor}: {ratio:.3f}x (per round {min(pairs):.2f}-{max(pairs):.2f})"
        )


def bench_big(engine: Engine, opts: Options) -> None:
    tag = f"layerkeep-bench/big-{uuid.uuid4().hex[:8]}:1"
    grown = tag.replace(":1", ":grown")
    with tempfile.TemporaryDirectory(prefix="layerkeep-bench-") as folder:
        work = Path(folder)
        try:
            build_big(engine, work, tag)
            size = int((engine.image_attrs(tag) or {})["Size"])
            print(f"test image {tag}: {size / 1e6:.0f} MB")
            figures: Figures = {}
            for _ in range(opts.runs):
                full_save_round(engine, [tag], work, opts, figures)
            summary(
                "full save (empty cache)", figures, "cache.save, empty cache",
                ["docker save | zstd -T0 -3", "raw docker save -o"],
            )
            bench_grown(engine, work, (tag, grown), opts)
            bench_load(engine, work, tag, opts)
            bench_rss(work, tag, opts)
            bench_unchanged(engine, work, tag, opts)
        finally:
            remove(engine, grown, tag)


def bench_grown(engine: Engine, work: Path, tags: tuple[str, str], opts: Options) -> None:
    """The CI case: the cache holds the image; a build adds one small layer on top."""
    tag, grown = tags
    cached = CacheDir(work / "cached")
    save(engine, cached, [tag], opts)
    (work / "small").mkdir()
    (work / "small" / "Dockerfile").write_text(f"FROM {tag}\nRUN echo small > /small\n")
    engine.build(work / "small", tag=grown)
    moved = f"{tag.rsplit(':', 1)[0]}:ci"
    figures: Figures = {}
    layers = 0
    for round_number in range(opts.runs):
        # The cache's copy of the image under the tag that now names the grown one.
        shutil.copytree(cached.root, work / "run")
        manifest = json.loads((work / "run" / "manifest.json").read_text())
        manifest["images"] = {moved: manifest["images"][tag]}
        (work / "run" / "manifest.json").write_text(json.dumps(manifest))
        engine.tag_image(grown, moved)
        steps: list[tuple[str, Callable[[], object]]] = [
            ("raw docker save -o", lambda: shell(f"docker save -o {work}/raw.tar {moved}")),
            (
                "cache.save, one small new layer",
                lambda: save(engine, CacheDir(work / "run"), [moved], opts),
            ),
        ]
        for label, step in steps[round_number % 2:] + steps[:round_number % 2]:
            figures.setdefault(label, []).append(timed(step))
        saved = json.loads((work / "run" / "manifest.json").read_text())["images"][moved]
        layers = len(saved["layers"])
        shutil.rmtree(work / "run")
        (work / "raw.tar").unlink()
        remove(engine, moved)
    summary(
        "one small new layer on the cached image", figures, "cache.save, one small new layer",
        ["raw docker save -o"],
    )
    remove(engine, grown)
    print(f"  the grown image has {layers} layers")


def bench_load(engine: Engine, work: Path, tag: str, opts: Options) -> None:
    """Load with the image absent and its base present, vs a raw load of its save."""
    cache = CacheDir(work / "load")
    save(engine, cache, [tag], opts)
    shell(f"docker save -o {work}/image.tar {tag}")
    figures: Figures = {}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("raw docker load -i", lambda: shell(f"docker load -q -i {work}/image.tar >/dev/null")),
        ("cache.load", lambda: load_images(engine, cache, log=quiet)),
    ]
    for round_number in range(opts.runs):
        for label, step in steps[round_number % 2:] + steps[:round_number % 2]:
            remove(engine, tag)
            figures.setdefault(label, []).append(timed(step))
    summary(
        "load, image absent, base present", figures, "cache.load", ["raw docker load -i"]
    )
    (work / "image.tar").unlink()


def bench_rss(work: Path, tag: str, opts: Options) -> None:
    print("\npeak RSS of a process running the full save")
    for wanted in dict.fromkeys([opts.threads, 4]):
        command = [sys.executable, "-c", SAVE_SCRIPT, str(work / "rss"), str(opts.level)]
        out = subprocess.run(
            [*command, str(wanted), tag],
            capture_output=True, text=True, check=True, cwd=REPO,
        ).stdout.split()
        shutil.rmtree(work / "rss")
        print(
            f"  threads={wanted} ({'auto' if wanted == 0 else 'set'}): "
            f"{int(out[1]) / 1024:.0f} MB, {float(out[0]):.2f} s with the process start"
        )


def bench_unchanged(engine: Engine, work: Path, tag: str, opts: Options) -> None:
    cache = CacheDir(work / "same")
    save(engine, cache, [tag], opts)
    same = save(engine, cache, [tag], opts)
    # A fully cached BuildKit rebuild: same layers, another inline cache in the config.
    cached = cache.read_manifest().images[tag]
    config = json.loads(cached.config)
    config["moby.buildkit.cache.v0"] = "eyJsYXllcnMiOltdfQ=="
    sources = [LayerSource(digest, 0, None) for digest in cached.layers]
    engine.load_archive(legacy_archive(json.dumps(config), sources, [tag]), image=tag)
    rebuilt = save(engine, cache, [tag], opts)
    print("\nunchanged saves of the test image")
    print(f"  same image id:                       {same.seconds * 1000:.0f} ms")
    print(
        f"  new id, only BuildKit's cache differs: {rebuilt.seconds * 1000:.0f} ms "
        f"({'up to date' if rebuilt.skipped else 'READ AGAIN'}, "
        f"{rebuilt.engine_reads} docker save)"
    )


def bench_example(engine: Engine, opts: Options) -> None:
    with tempfile.TemporaryDirectory(prefix="layerkeep-bench-") as folder:
        root = Path(folder)
        shutil.copytree(REPO / "example", root / "example")
        for kind in ("buildkit", "legacy"):
            image = f"layerkeep-bench/example-{kind}-{uuid.uuid4().hex[:6]}"
            (root / ".env").write_text(
                f"LAYERKEEP_IMAGE={image}\nLAYERKEEP_CONTEXT=example\nLAYERKEEP_CACHE_DIR=c\n"
            )
            settings = load_settings(root, {}, git_facts=lambda _: GitFacts("", ""))
            images = images_to_cache(settings)
            builder = choose_builder(kind, os.environ, engine=engine)
            try:
                build_image(engine, settings, builder, os.environ, log=quiet)
                cache = CacheDir(settings.cache_dir)
                save(engine, cache, images, opts)
                before = [engine.image_id(i) for i in images]
                build_image(engine, settings, builder, os.environ, log=quiet)
                after = [engine.image_id(i) for i in images]
                again = save(engine, cache, images, opts)
                print(
                    f"\nexample, unchanged rebuild ({kind}): save {again.seconds * 1000:.0f} ms, "
                    f"{'up to date' if again.skipped else 'READ AGAIN'}, "
                    f"{sum(b != a for b, a in zip(before, after, strict=True))} new image id(s)"
                )
                if kind == "buildkit":
                    figures: Figures = {}
                    with tempfile.TemporaryDirectory(prefix="layerkeep-bench-") as scratch:
                        for _ in range(opts.runs):
                            full_save_round(engine, images, Path(scratch), opts, figures)
                    summary(
                        "example (app + stage), full save", figures, "cache.save, empty cache",
                        ["docker save | zstd -T0 -3", "raw docker save -o"],
                    )
            finally:
                remove_repository(engine, image)
                shutil.rmtree(settings.cache_dir, ignore_errors=True)


def machine() -> str:
    info = subprocess.run(
        ["docker", "version", "--format", "{{.Server.Version}}"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({model}), engine {info}, Python {platform.python_version()}, "
        f"load average {load[0]:.1f} at the start"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: one per core, at most 4")
    parser.add_argument("--example", action="store_true", help="also the bundled example")
    args = parser.parse_args()
    print(machine())
    engine = connect(os.environ, labels={})
    opts = Options(args.runs, args.level, args.threads)
    bench_big(engine, opts)
    if args.example:
        bench_example(engine, opts)


if __name__ == "__main__":
    main()
