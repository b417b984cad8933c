"""A real qaas API process on a free port, and Debian's Chromium driven by Playwright (offline)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import IN_CI

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying hosts this closed network refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]


@pytest.fixture
def api_url(tmp_path: Path) -> Iterator[str]:
    """`qaas migrate` then `qaas api` on the embedded default, data in tmp_path/var."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {
        "QAAS_DATA_DIR": str(tmp_path / "var"),
        "QAAS_DATABASE_URL": "",
        "QAAS_BROKER_URL": "",
    }
    subprocess.run([sys.executable, "-m", "qaas", "migrate"], env=env, check=True, capture_output=True)
    log_path = tmp_path / "api.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qaas", "api", "--port", str(port)], env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Debian Chromium; skipped where it is missing, except under CI=true, where that fails."""
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("Debian's chromium is needed: apt-get install chromium")
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def screenshots() -> Path:
    """Where screenshots are kept after the run, for a person to look at: QAAS_TEST_ARTIFACTS or
    ./test-artifacts (git ignores it)."""
    folder = Path(
        os.environ.get("QAAS_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "test-artifacts"
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder
