"""Wall time of `inv ci` on the bundled example: cold vs restored from the cache.

    python bench/bench_ci.py [--builder legacy|buildkit|both] [--runs N]

Each run wipes the app images and the builder's cache like a fresh CI machine; a cold
run also starts without a cache folder, a restored run keeps it. Prints seconds, steps
reused and the restored/cold ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

REPO = Path(__file__).resolve().parent.parent
IMAGE = "layerkeep-bench/shortener"
STEPS = re.compile(r"^image\.build\s+ok\s+[\d.]+ s\s+(\d+)/(\d+) steps reused", re.MULTILINE)


def wipe(client: docker.DockerClient) -> None:
    for tag in (f"{IMAGE}:latest", f"{IMAGE}:latest-stage-builder"):
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(tag, force=True)
    client.api.prune_builds(all=True)


def run_ci(project: Path, builder: str, cache: Path) -> tuple[float, str]:
    env = {
        **os.environ,
        "LAYERKEEP_IMAGE": IMAGE,
        "LAYERKEEP_BUILDER": builder,
        "LAYERKEEP_CACHE_DIR": str(cache),
        "LAYERKEEP_BUILD_ID": f"bench-{os.getpid()}",
        "LAYERKEEP_REPORTS_DIR": str(project / "reports"),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "invoke", "ci"], cwd=project, env=env,
        capture_output=True, text=True, check=False,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"inv ci failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr}")
    match = STEPS.search(done.stdout)
    return seconds, f"{match[1]}/{match[2]}" if match else "?"


def bench(builder: str, runs: int, folder: Path) -> None:
    client = docker.from_env()
    project = folder / builder
    shutil.copytree(REPO / "example", project / "example")
    shutil.copy(REPO / ".env", project / ".env")
    (project / "tasks.py").write_text("from layerkeep.tasks import ns\n")
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run(["git", "-C", str(project), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(project), "-c", "user.name=b", "-c", "user.email=b@b",
         "commit", "-qm", "bench"], check=True,
    )
    cache = project / "cache"
    cold: list[float] = []
    warm: list[float] = []
    steps = ""
    for _ in range(runs):
        shutil.rmtree(cache, ignore_errors=True)
        wipe(client)
        cold.append(run_ci(project, builder, cache)[0])
        wipe(client)
        seconds, steps = run_ci(project, builder, cache)
        warm.append(seconds)
    wipe(client)
    cold_median, warm_median = statistics.median(cold), statistics.median(warm)
    print(
        f"[{builder}] inv ci cold {cold_median:.1f} s, restored {warm_median:.1f} s "
        f"({steps} steps reused); restored/cold = {warm_median / cold_median:.2f} "
        f"(median of {runs}; cold runs {', '.join(f'{x:.1f}' for x in cold)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--builder", choices=["legacy", "buildkit", "both"], default="both")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        for builder in ["legacy", "buildkit"] if args.builder == "both" else [args.builder]:
            bench(builder, args.runs, Path(folder))


if __name__ == "__main__":
    main()
