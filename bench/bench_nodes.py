"""Wall time of a test suite on 1 node and split over N nodes, by test.run itself.

    python bench/bench_nodes.py [--nodes 2,4] [--kind sleep|cpu|both] [--files 24]

A synthetic pytest suite of uneven files (a few slow, many quick) runs in an image
with pytest (python:3.11-slim plus pytest, built once). First one node runs it all,
which also records each file's seconds in the cache folder's timing history; then,
for each N:

- one machine: ``--nodes N``, N test containers at once on this engine;
- across machines (simulated): each CI node's share run alone, one after the other
  (LAYERKEEP_NODE_INDEX/_TOTAL), as N machines would; the job's test time is its
  slowest node's.

``sleep`` tests wait (as tests waiting on a database or the network do), ``cpu`` tests
compute: N containers on one machine share its cores, N machines do not. The time is
test.run's own (containers, pytest start, the tests, reports), measured around
``run_tests``. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from layerkeep.core.ci_vars import GitFacts  # noqa: E402
from layerkeep.core.engine import Engine, connect  # noqa: E402
from layerkeep.core.job import Job  # noqa: E402
from layerkeep.core.settings import Settings, load_settings  # noqa: E402
from layerkeep.testrun.run import run_tests  # noqa: E402

IMAGE = "layerkeep-bench/pytest:1"
DOCKERFILE = "FROM python:3.11-slim\nRUN pip install --no-cache-dir pytest==8.3.3\n"
COMMAND = "python -m pytest -q -p no:cacheprovider --junitxml=/reports/junit.xml"
# Seconds of the suite's files, before scaling to --seconds: a few slow files and many
# quick ones, as real suites have (integration tests beside unit tests).
SHAPE = [9, 7, 5, 4, 3, 3, 2, 2, 2, 1.5, 1.5, 1, 1, 1, 1, 0.8, 0.8, 0.6, 0.5, 0.5, 0.4,
         0.3, 0.2, 0.2]
CPU_LOOP = "def spin(seconds):\n    end = time.process_time() + seconds\n" \
           "    while time.process_time() < end:\n        pass\n"


def write_suite(root: Path, kind: str, files: int, seconds: float) -> float:
    """Write the suite (4 tests per file); its total seconds."""
    shape = (SHAPE * (files // len(SHAPE) + 1))[:files]
    scale = seconds / sum(shape)
    tests = root / "tests"
    tests.mkdir(parents=True)
    for number, weight in enumerate(shape):
        each = round(weight * scale / 4, 3)
        call = f"time.sleep({each})" if kind == "sleep" else f"spin({each})"
        body = "".join(f"def test_{n}():\n    {call}\n\n" for n in range(4))
        (tests / f"test_{number:02}.py").write_text(f"import time\n\n{CPU_LOOP}\n{body}")
    return sum(round(weight * scale / 4, 3) * 4 for weight in shape)


def settings_for(root: Path, **environ: str) -> Settings:
    return load_settings(
        root,
        {
            "LAYERKEEP_IMAGE": IMAGE,
            "LAYERKEEP_PROJECT": "bench-nodes",
            "LAYERKEEP_BUILD_ID": f"bench-{uuid.uuid4().hex[:8]}",
            "LAYERKEEP_TEST_MOUNTS": "tests:/work/tests:ro",
            "LAYERKEEP_TEST_WORKDIR": "/work",
            "LAYERKEEP_TEST_COMMAND": COMMAND,
            "LAYERKEEP_TEST_FILES": "tests/test_*.py",
            "LAYERKEEP_CACHE_DIR": "cache",
            "LAYERKEEP_COMMIT": "b0b0",
            **environ,
        },
        git_facts=lambda _: GitFacts("", ""),
    )


def timed(engine: Engine, settings: Settings) -> tuple[float, list[float | None]]:
    """test.run's wall time and each node's test time."""
    started = time.monotonic()
    result = run_tests(engine.for_job(Job.from_settings(settings)), settings, log=lambda _: None)
    seconds = time.monotonic() - started
    if not result.passed:
        sys.exit(f"the suite failed: {result.note()}")
    return seconds, [node.test_seconds for node in result.nodes]


def bench(engine: Engine, kind: str, counts: list[int], files: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as folder:
        root = Path(folder)
        total = write_suite(root, kind, files, seconds)
        print(f"\n{kind} suite: {files} files, {files * 4} tests, {total:.1f} s of tests, "
              f"{os.cpu_count()} cores")
        print(f"{'how':44} {'wall':>7} {'vs 1':>6}  nodes' test times")
        one, _ = timed(engine, settings_for(root, LAYERKEEP_COMMIT="a0a0"))
        print(f"{'1 node':44} {one:6.1f}s {1:5.2f}x")
        for count in counts:
            wall, nodes = timed(engine, settings_for(root, LAYERKEEP_TEST_NODES=str(count)))
            shown = " ".join(f"{value:.1f}" for value in nodes if value is not None)
            print(f"{f'{count} nodes, one machine (--nodes {count})':44} {wall:6.1f}s "
                  f"{one / wall:5.2f}x  {shown}")
            alone = [
                timed(engine, settings_for(
                    root, LAYERKEEP_NODE_INDEX=str(index), LAYERKEEP_NODE_TOTAL=str(count),
                ))[0]
                for index in range(1, count + 1)
            ]
            slowest = max(alone)
            shown = " ".join(f"{value:.1f}" for value in alone)
            print(f"{f'{count} nodes, {count} machines (slowest node)':44} {slowest:6.1f}s "
                  f"{one / slowest:5.2f}x  {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", default="2,4", help="node counts, comma-separated")
    parser.add_argument("--kind", choices=["sleep", "cpu", "both"], default="both")
    parser.add_argument("--files", type=int, default=24, help="test files in the suite")
    parser.add_argument("--seconds", type=float, default=40.0, help="the suite's test time")
    args = parser.parse_args()
    engine = connect(os.environ, labels={"io.layerkeep.bench": "nodes"})
    with tempfile.TemporaryDirectory(prefix="bench-nodes-image-") as folder:
        (Path(folder) / "Dockerfile").write_text(DOCKERFILE)
        engine.build(Path(folder), tag=IMAGE)
    counts = [int(part) for part in args.nodes.split(",")]
    for kind in ("sleep", "cpu") if args.kind == "both" else (args.kind,):
        bench(engine, kind, counts, args.files, args.seconds)


if __name__ == "__main__":
    main()
