"""The report page and the model's page in a real browser: they render their charts and fetch nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.db import session_scope
from app.services import models as model_service
from tests.api.conftest import MLP_INSPECTION
from tests.api.test_reports import METRICS, finish_job
from tests.conftest import configure, reset_caches

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def finished_job(api_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A job finished through the services, in the database of the server that api_url serves."""
    client = httpx.Client(base_url=api_url)
    model_id = client.post("/v1/models", files={"file": ("mlp.pt2", b"not a model")}).json()["id"]
    configure(monkeypatch, tmp_path / "var")  # this process's services now use the server's data dir
    with session_scope() as session:
        model_service.record_inspection(session, model_id, result=MLP_INSPECTION, error=None)
    response = client.post("/v1/jobs", json={"model_id": model_id, "mode": "dynamic"})
    assert response.status_code == 202, response.text
    job_id = str(response.json()["id"])
    finish_job(job_id, tmp_path, METRICS)
    # A second, newer job to compare with on the model's page.
    other = client.post(
        "/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"}
    ).json()["id"]
    metrics = METRICS | {
        "size": METRICS["size"] | {"ratio": 3.5},
        "fidelity": METRICS["fidelity"] | {"sqnr_db": 30.2},
    }
    finish_job(other, tmp_path, metrics, backend="fbgemm")
    yield job_id
    reset_caches()


def test_report_page_renders_its_charts_offline(
    api_url: str, finished_job: str, browser: Any, screenshots: Path
) -> None:
    outside: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("request", lambda r: None if r.url.startswith(api_url) else outside.append(r.url))
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

    response = page.goto(f"{api_url}/v1/jobs/{finished_job}/report.html")
    assert response is not None and response.status == 200
    for chart in ("#latency-chart", "#layer-chart"):
        svg = page.locator(chart)
        assert svg.is_visible()
        box = svg.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 150, (chart, box)
    assert page.locator("#latency-chart rect.bar-int8:not(.swatch)").count() == len(METRICS["latency"])
    assert page.locator("#layer-chart rect:not(.swatch)").count() == len(METRICS["layers"]["per_layer"])
    assert "4.02×" in page.locator(".cards").inner_text()
    assert page.locator("#load-snippet").inner_text().startswith("import torch")
    page.screenshot(path=str(screenshots / "report.png"), full_page=True)

    # The model's page links each job to its report, relatively (so it works behind a path prefix).
    page.locator("nav a", has_text="All jobs of this model").click()
    page.wait_for_load_state()
    assert page.locator("tr.job-row").count() == 2
    page.screenshot(path=str(screenshots / "model-jobs.png"), full_page=True)
    page.locator("tr.job-row a", has_text=finished_job).click()
    page.wait_for_load_state()
    assert page.url == f"{api_url}/v1/jobs/{finished_job}/report.html"

    assert outside == [], f"the page loaded something from outside qaas: {outside}"
    assert errors == [], f"the page logged errors (a blocked resource or a CSP violation?): {errors}"
