"""layerkeep's cache against BuildKit's own, side by side, each CI run on a fresh engine.

    python bench/bench_buildkit_cache.py [--backend dir|registry|both]
                                         [--store containerd|classic|both]
                                         [--compression zstd|gzip]

The recipe a user would pick instead of layerkeep (docker/build-push-action's):
``docker buildx build --cache-from type=local,src=C --cache-to type=local,dest=C2,mode=max``
then ``rm -rf C && mv C2 C`` (or ``type=registry`` refs). It needs an engine that
exports BuildKit's cache: the containerd image store. The app: a deps stage that ADDs
about 300 MB of real binaries (this host's, so they compress like real ones) and runs
12 s, and a final stage that copies from it, runs 6 s and copies one source file.

Each CI run starts a new engine (Docker 26.1.5 from tests/second_engine.py, not timed)
that gets only the base image and the cache folder the run before left (or the
registry); the recipes alternate, each on engines of its own. Runs: cold, unchanged,
one edit of the source file. Printed per run: restore + build + save, layerkeep's
phases (its run report), and the ratio layerkeep / BuildKit; then the cache size. On
the classic store (where BuildKit cannot export its cache with the docker driver)
layerkeep's phases alone. ``--compression`` is layerkeep's LAYERKEEP_LAYER_COMPRESSION
(default zstd; the recipe keeps BuildKit's default, gzip). Prints figures; asserts
nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from registry_setup import Registry, running_registry  # noqa: E402
from second_engine import ensure_docker26, second_engine, transfer_images  # noqa: E402

BASE = "debian:bookworm-slim"
IMAGE = "bench-bk/app"
DOCKERFILE = """\
FROM debian:bookworm-slim AS deps
ADD bin/ /opt/bin/
RUN sleep 12 && sha256sum /opt/bin/* > /opt/sums

FROM debian:bookworm-slim
COPY --from=deps /opt /opt
RUN sleep 6 && echo built > /opt/stamp
COPY app.txt /app/app.txt
"""
DEPS_BYTES = 300_000_000
RUNS = ("cold", "unchanged", "edit")


def make_app(root: Path) -> None:
    """The app's context: the Dockerfile, ~300 MB of this host's binaries, a source."""
    bins = root / "bin"
    bins.mkdir(parents=True)
    total = 0
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib"):
        for path in sorted(Path(folder).rglob("*")) if Path(folder).is_dir() else []:
            if total >= DEPS_BYTES:
                break
            if path.is_symlink() or not path.is_file() or path.stat().st_size < 100_000:
                continue
            target = bins / "_".join(path.parts[1:])
            if not target.exists():
                shutil.copyfile(path, target)
                total += target.stat().st_size
    (root / "Dockerfile").write_text(DOCKERFILE)
    (root / "app.txt").write_text("v0\n")
    (root / ".dockerignore").write_text(".git\ncache*\nreports\nlayerkeep.env\ntasks.py\n")
    (root / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    # The binaries come from a download step, as large artifacts do, not from git.
    (root / ".gitignore").write_text("cache*\nreports\nbin/\n")
    git(root, "init", "-q", "-b", "main")
    commit(root, "first")


def git(root: Path, *arguments: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com", *arguments],
        cwd=root, check=True, capture_output=True,
    )


def commit(root: Path, message: str) -> None:
    git(root, "add", "-A", ".")
    git(root, "commit", "-q", "--allow-empty", "-m", message)


@dataclass
class Run:
    """One CI run of one recipe: wall seconds, and layerkeep's phases."""

    seconds: float
    phases: Mapping[str, float]
    reused: str = ""


@contextlib.contextmanager
def fresh_engine(folder: Path, *, containerd: bool) -> Iterator[dict[str, str]]:
    """A new Docker 26 engine holding only the base image: its client environment."""
    with second_engine(folder, docker26=ensure_docker26(), containerd_store=containerd) as engine:
        transfer_images(os.environ, engine.environ, [BASE])
        yield dict(engine.environ)


def layerkeep_run(app: Path, environ: Mapping[str, str], settings: Mapping[str, str]) -> Run:
    """`inv cache.save` (git.touch, cache.load, image.build, cache.save) in a fresh clone
    of ``app`` (as a CI job checks out the commit), with the cache folder moved in."""
    checkout = app.parent / f"{app.name}-checkout"
    shutil.rmtree(checkout, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", str(app), str(checkout)], check=True)
    shutil.copytree(app / "bin", checkout / "bin", copy_function=os.link)
    if (app / "cache").exists():
        (app / "cache").rename(checkout / "cache")
    (checkout / "layerkeep.env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))
    clean = {k: v for k, v in environ.items() if not k.startswith(("LAYERKEEP_", "CI"))}
    started = time.monotonic()
    done = subprocess.run(
        ["inv", "cache.save"], cwd=checkout, env=clean, capture_output=True, text=True,
        check=False,
    )
    seconds = time.monotonic() - started
    if done.returncode:
        sys.exit(f"inv cache.save failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
    if (checkout / "cache").exists():
        (checkout / "cache").rename(app / "cache")
    report = json.loads((checkout / "reports" / "layerkeep-report.json").read_text())
    phases = {task["name"]: float(task["seconds"]) for task in report["tasks"]}
    build = next(task for task in report["tasks"] if task["name"] == "image.build")
    figures = build["figures"]
    return Run(seconds, phases, f"{figures['steps_reused']}/{figures['steps_total']}")


def buildkit_run(app: Path, environ: Mapping[str, str], cache_from: str, cache_to: str) -> Run:
    """BuildKit's recipe: one `docker buildx build` importing and exporting its cache."""
    docker = shutil.which("docker", path=environ["PATH"]) or "docker"
    command = [docker, "buildx", "build", "--progress=plain", "-t", f"{IMAGE}:latest"]
    if cache_from:
        command += ["--cache-from", cache_from]
    command += ["--cache-to", cache_to, str(app)]
    started = time.monotonic()
    done = subprocess.run(command, env=dict(environ), capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"docker buildx build failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return Run(time.monotonic() - started, {}, f"{done.stderr.count(' CACHED')} cached")


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def edit(app: Path, run: str) -> None:
    if run == "edit":
        (app / "app.txt").write_text(f"edited {time.time()}\n")
        commit(app, "edit")


def bench_dir(work: Path, compression: str) -> None:
    """The folder backend against BuildKit's local cache, on the containerd store."""
    ours, theirs = work / "ours", work / "theirs"
    for root in (ours, theirs):
        make_app(root)
    settings = {
        "LAYERKEEP_IMAGE": IMAGE, "LAYERKEEP_CONTEXT": ".", "LAYERKEEP_CACHE_DIR": "cache",
        "LAYERKEEP_REPORTS_DIR": "reports",
        "LAYERKEEP_LAYER_COMPRESSION": compression,
    }
    local = theirs / "cache"
    print("containerd store, folder cache (seconds: restore + build + save)")
    for run in RUNS:
        for root in (ours, theirs):
            edit(root, run)
        with fresh_engine(work / f"engine-ours-{run}", containerd=True) as environ:
            mine = layerkeep_run(ours, environ, settings)
        with fresh_engine(work / f"engine-theirs-{run}", containerd=True) as environ:
            source = f"type=local,src={local}" if local.exists() else ""
            other = buildkit_run(theirs, environ, source, f"type=local,dest={local}-new,mode=max")
            shutil.rmtree(local, ignore_errors=True)
            (theirs / "cache-new").rename(local)
        report(run, mine, other)
    print(
        f"  cache folder: layerkeep {size_mb(ours / 'cache'):.0f} MB, "
        f"BuildKit {size_mb(local):.0f} MB"
    )


def bench_registry(work: Path, registry: Registry, compression: str) -> None:
    """The registry backend against BuildKit's registry cache, on the containerd store."""
    ours, theirs = work / "ours", work / "theirs"
    for root in (ours, theirs):
        make_app(root)
    settings = {
        "LAYERKEEP_IMAGE": IMAGE, "LAYERKEEP_CONTEXT": ".", "LAYERKEEP_CACHE_BACKEND": "registry",
        "LAYERKEEP_REGISTRY": registry.address, "LAYERKEEP_BRANCH": "main",
        "LAYERKEEP_REPORTS_DIR": "reports",
        "LAYERKEEP_LAYER_COMPRESSION": compression,
    }
    ref = f"{registry.address}/bench-theirs-cache:main"
    print("containerd store, registry cache (seconds: restore + build + save)")
    for index, run in enumerate(RUNS):
        for root in (ours, theirs):
            edit(root, run)
        with fresh_engine(work / f"engine-ours-{run}", containerd=True) as environ:
            mine = layerkeep_run(ours, environ, settings)
        with fresh_engine(work / f"engine-theirs-{run}", containerd=True) as environ:
            source = f"type=registry,ref={ref}" if index else ""
            other = buildkit_run(theirs, environ, source, f"type=registry,ref={ref},mode=max")
        report(run, mine, other)


def bench_classic(work: Path) -> None:
    """layerkeep's phases on the classic store (images, inline cache completed)."""
    ours = work / "ours"
    make_app(ours)
    settings = {
        "LAYERKEEP_IMAGE": IMAGE, "LAYERKEEP_CONTEXT": ".", "LAYERKEEP_CACHE_DIR": "cache",
        "LAYERKEEP_REPORTS_DIR": "reports",
    }
    print("classic store, folder cache: layerkeep alone (BuildKit exports no cache there)")
    for run in RUNS:
        edit(ours, run)
        with fresh_engine(work / f"engine-{run}", containerd=False) as environ:
            mine = layerkeep_run(ours, environ, settings)
        print(f"  {run:<10} {mine.seconds:6.1f} s  {phases(mine)}  steps {mine.reused}")
    print(f"  cache folder: {size_mb(ours / 'cache'):.0f} MB")


def phases(run: Run) -> str:
    names = ("cache.load", "image.build", "cache.save")
    return ", ".join(f"{name.split('.')[1]} {run.phases.get(name, 0.0):.1f}" for name in names)


def report(run: str, mine: Run, other: Run) -> None:
    print(
        f"  {run:<10} layerkeep {mine.seconds:6.1f} s ({phases(mine)}; steps {mine.reused})"
        f"  BuildKit {other.seconds:6.1f} s ({other.reused})"
        f"  ratio {mine.seconds / other.seconds:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["dir", "registry", "both"], default="both")
    parser.add_argument("--store", choices=["containerd", "classic", "both"], default="both")
    parser.add_argument("--compression", choices=["zstd", "gzip"], default="zstd")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-bk-", dir="/var/tmp") as folder:
        work = Path(folder)
        if arguments.store in ("containerd", "both"):
            if arguments.backend in ("dir", "both"):
                bench_dir(work / "dir", arguments.compression)
            if arguments.backend in ("registry", "both"):
                with running_registry(work / "registry") as registry:
                    bench_registry(work / "registry-runs", registry, arguments.compression)
        if arguments.store in ("classic", "both"):
            bench_classic(work / "classic")


if __name__ == "__main__":
    main()
