"""Swagger UI in a real browser, offline: the page renders from qaas's own assets and uploads a model."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def api_url(tmp_path: Path) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {
        "QAAS_DATA_DIR": str(tmp_path / "var"),
        "QAAS_DATABASE_URL": "",
        "QAAS_BROKER_URL": "",
    }
    subprocess.run([sys.executable, "-m", "qaas", "migrate"], env=env, check=True, capture_output=True)
    log = open(tmp_path / "api.log", "wb")  # noqa: SIM115 (closed below)
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
            assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "api.log").read_text()
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_swagger_ui_renders_offline_and_uploads_a_model(api_url: str, tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        if IN_CI:
            pytest.fail("Debian's chromium is needed: apt-get install chromium")
        pytest.skip("chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    model_file = tmp_path / "tiny.pt2"
    model_file.write_bytes(b"uploaded from swagger ui " * 100)

    outside: list[str] = []
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        page = browser.new_page()
        page.on(
            "request",
            lambda request: None if request.url.startswith(api_url) else outside.append(request.url),
        )
        page.goto(f"{api_url}/docs")
        page.locator(".opblock-post .opblock-summary-path", has_text="/v1/models").first.click()
        block = page.locator(".opblock-post").filter(has_text="/v1/models").first
        block.locator("input[type=file]").set_input_files(str(model_file))
        block.locator("button.execute").click()
        status = block.locator(".live-responses-table tr.response .response-col_status").first
        status.wait_for(timeout=20_000)
        body = block.locator(".live-responses-table tr.response .response-col_description").first.inner_text()
        assert status.inner_text().strip() == "201", body
        page.screenshot(path=str(tmp_path / "swagger.png"))
        browser.close()

    assert outside == [], f"the page loaded assets from outside qaas: {outside}"
    [model] = httpx.get(f"{api_url}/v1/models").json()["items"]
    assert model["name"] == "tiny.pt2"
    assert model["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
