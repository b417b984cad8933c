"""Swagger UI in a real browser, offline: the page renders from qaas's own assets and uploads a model."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_swagger_ui_renders_offline_and_uploads_a_model(
    api_url: str, browser: Any, tmp_path: Path, screenshots: Path
) -> None:
    model_file = tmp_path / "tiny.pt2"
    model_file.write_bytes(b"uploaded from swagger ui " * 100)

    outside: list[str] = []
    page = browser.new_page()
    page.on(
        "request", lambda request: None if request.url.startswith(api_url) else outside.append(request.url)
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
    page.screenshot(path=str(screenshots / "swagger.png"))

    assert outside == [], f"the page loaded assets from outside qaas: {outside}"
    [model] = httpx.get(f"{api_url}/v1/models").json()["items"]
    assert model["name"] == "tiny.pt2"
    assert model["sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()
