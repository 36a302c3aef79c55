"""Progress output: redrawn in place on a terminal, a few plain lines in a log."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from typing import Any

from layerkeep.core.progress import PlainMeter, for_stream
from layerkeep.core.registry import TransferProgress

# 2 s of work in 200 pieces of 1 MB; the plain form prints every 0.5 s.
WORK = """
import sys, time
from layerkeep.core.progress import for_stream
meter = for_stream(sys.stdout, interval=0.5)("saving app:latest", 200_000_000, "B")
for _ in range(200):
    time.sleep(0.01)
    meter.advance(1_000_000)
meter.close()
"""


def run_on_a_terminal() -> bytes:
    leader, follower = pty.openpty()
    child = subprocess.Popen(
        [sys.executable, "-c", WORK], stdout=follower, stderr=follower, close_fds=True
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    child.wait(timeout=30)
    os.close(leader)
    return output


def test_on_a_terminal_the_bar_redraws_in_place() -> None:
    output = run_on_a_terminal()
    assert output.count(b"\r") >= 3, output
    assert b"saving app:latest" in output
    assert b"200M/200M" in output


def test_in_a_log_a_few_plain_lines_and_no_carriage_returns() -> None:
    done = subprocess.run(
        [sys.executable, "-c", WORK], capture_output=True, text=True, check=True, timeout=30
    )
    lines = done.stdout.splitlines()
    assert "\r" not in done.stdout
    assert 2 <= len(lines) <= 8, lines
    assert lines[-1].startswith("saving app:latest: 200.0 MB of 200.0 MB (100%), ")
    assert "MB/s, done in" in lines[-1]


def test_plain_lines_wait_for_the_interval() -> None:
    now = [0.0]
    stream = io.StringIO()
    meter = PlainMeter("loading", None, "steps", stream=stream, interval=5, clock=lambda: now[0])
    for second in range(12):
        now[0] = float(second)
        meter.advance()
    meter.close()
    meter.close()
    assert stream.getvalue().splitlines() == [
        "loading: 6 steps",
        "loading: 11 steps",
        "loading: 12 steps, done in 11.0 s",
    ]


def test_quick_work_prints_nothing() -> None:
    stream = io.StringIO()
    with PlainMeter("pushing", 10, "B", stream=stream, interval=5, clock=lambda: 1.0) as meter:
        meter.advance(10)
    assert stream.getvalue() == ""


def test_factory_picks_plain_lines_for_a_file() -> None:
    stream = io.StringIO()
    meter = for_stream(stream)("pulling", 10, "B")
    assert isinstance(meter, PlainMeter)


def test_a_push_counts_each_layers_bytes_once() -> None:
    """The engine repeats each layer's running total; the meter gets what moved since."""
    stream = io.StringIO()
    now = [0.0]
    meter = PlainMeter("push app", None, "B", stream=stream, interval=1, clock=lambda: now[0])
    moved = TransferProgress(meter)
    records: list[dict[str, Any]] = [
        {"id": "a", "status": "Pushing", "progressDetail": {"current": 1_000_000}},
        {"id": "b", "status": "Pushing", "progressDetail": {"current": 500_000}},
        {"id": "a", "status": "Pushing", "progressDetail": {"current": 3_000_000}},
        {"id": "a", "status": "Pushed", "progressDetail": {}},
        {"status": "latest: digest: sha256:00 size: 1"},
    ]
    for record in records:
        now[0] += 0.5
        moved.note(record)
    moved.close()
    assert meter.done == 3_500_000
    assert stream.getvalue().splitlines()[-1].startswith("push app: 3.5 MB, ")
