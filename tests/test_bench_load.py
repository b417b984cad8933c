"""The load check (bench/load.py) at toy size: it starts `qaas serve`, loads it for 3 s and prints its tables
with no 5xx. No thresholds on the numbers: `python -m bench.load` at full size measures."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_load_check_runs_small_and_prints_its_tables(tmp_path: Path) -> None:
    markdown = tmp_path / "load.md"
    command = [
        sys.executable, "-m", "bench.load", "--pollers", "2", "--uploaders", "1", "--upload-mb", "1",
        "--duration", "3", "--rest", "1", "--job", "queued", "--work", str(tmp_path / "work"),
        "--markdown", str(markdown),
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "PASS: 5xx answers: 0; requests without an answer (connection errors, timeouts): 0" in done.stdout
    for title in (
        "Load check: polls",
        "Load check: uploads",
        "Load check: answers by status",
        "Load check: the server",
    ):
        assert title in done.stdout
    assert "job: GET /v1/jobs/{id}" in done.stdout and "dataset: GET /v1/datasets/{id}" in done.stdout
    assert "## Load check: polls" in markdown.read_text()
    assert elapsed < 40, f"the smoke run took {elapsed:.0f} s"
