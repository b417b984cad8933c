"""GET /metrics through the real app, SQLite and PostgreSQL: job numbers read from the database, upload bytes,
no API key needed, no tenant or object named, and a clear 503 when the database is down."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

from app.core.db import session_scope
from app.main import create_app
from app.models import Job
from app.models.common import utcnow
from app.services import auth
from app.services import jobs as job_service
from app.services.metrics import DURATION_BUCKETS, EXIT_REASONS, exit_reason
from qaas.contract.errors import Kind
from tests.api.test_reports import finish_job
from tests.api.test_tenancy import METRICS, ready_dataset, ready_model
from tests.conftest import configure, reset_caches
from tests.test_error_catalogue import raised_codes

TENANT = "zebra-industries"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def keyed(service_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, TestClient]]:
    """(a tenant's client with its key, a client with no key) on one app with QAAS_AUTH=required."""
    monkeypatch.setenv("QAAS_AUTH", "required")
    reset_caches()
    with session_scope() as session:
        key = auth.create_key(session, TENANT, "test")[1]
    app = create_app()
    with (
        TestClient(app, headers={"Authorization": f"Bearer {key}"}) as tenant,
        TestClient(app) as anonymous,
    ):
        yield tenant, anonymous


def scrape(client: TestClient) -> tuple[str, Samples]:
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def submit(client: TestClient, model_id: str, **body: Any) -> str:
    response = client.post(
        "/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "auto"} | body
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def claim(job_id: str) -> None:
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w1", 30) is not None


def took(job_id: str, seconds: float, ago: timedelta = timedelta(minutes=1)) -> None:
    """Make the job's run last `seconds` and end `ago`."""
    finished = utcnow() - ago
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(started_at=finished - timedelta(seconds=seconds), finished_at=finished)
        )


def test_metrics_count_jobs_durations_and_exits_from_the_database(
    keyed: tuple[TestClient, TestClient], service_env: Path
) -> None:
    tenant, anonymous = keyed
    _, before = scrape(anonymous)
    model_id = ready_model(tenant)
    dataset_id = ready_dataset(tenant)

    queued = submit(tenant, model_id)
    running = submit(tenant, model_id)
    claim(running)
    succeeded = submit(tenant, model_id)
    finish_job(succeeded, service_env, METRICS)
    took(succeeded, 42)
    static = submit(tenant, model_id, mode="static", calibration_dataset_id=dataset_id)
    finish_job(static, service_env, METRICS)
    took(static, 700)
    out_of_memory = submit(tenant, model_id)
    claim(out_of_memory)
    # A hostile runner chooses its error code: it must not become a label.
    hostile = submit(tenant, model_id)
    claim(hostile)
    with session_scope() as session:
        assert job_service.fail_job(session, out_of_memory, "w1", "memory_limit", "out of memory")
        assert job_service.fail_job(session, hostile, "w1", f"{TENANT}_{hostile}", "made up")
    took(out_of_memory, 3)
    took(hostile, 10)
    cancelled_queued = submit(tenant, model_id)
    assert tenant.post(f"/v1/jobs/{cancelled_queued}/cancel").status_code == 202
    cancelled_running = submit(tenant, model_id)
    claim(cancelled_running)
    with session_scope() as session:
        assert job_service.mark_cancelled(session, cancelled_running, "w1")
    took(cancelled_running, 5)
    # Finished two days ago: outside the window of every finished-job metric.
    old = submit(tenant, model_id)
    claim(old)
    with session_scope() as session:
        assert job_service.fail_job(session, old, "w1", "internal_error", "long ago")
    took(old, 20, ago=timedelta(days=2))

    text, samples = scrape(anonymous)  # no key: scrapers have none

    expected_jobs = {
        ("queued", "dynamic"): 1,
        ("running", "dynamic"): 1,
        ("succeeded", "dynamic"): 1,
        ("succeeded", "static"): 1,
        ("failed", "dynamic"): 2,
        ("cancelled", "dynamic"): 2,
    }
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        for mode in ("dynamic", "static", "qat"):
            count = value(samples, "qaas_jobs", status=status, mode=mode)
            assert count == expected_jobs.get((status, mode), 0), (status, mode)
    assert value(samples, "qaas_queue_depth") == 1

    def histogram(mode: str, status: str) -> tuple[float, float, dict[str, float]]:
        buckets = {
            le: value(samples, "qaas_job_duration_seconds_bucket", mode=mode, status=status, le=le)
            for le in [f"{bound:g}" for bound in DURATION_BUCKETS] + ["+Inf"]
        }
        count = value(samples, "qaas_job_duration_seconds_count", mode=mode, status=status)
        total = value(samples, "qaas_job_duration_seconds_sum", mode=mode, status=status)
        return count, total, buckets

    count, total, buckets = histogram("dynamic", "succeeded")
    assert (count, buckets["30"], buckets["60"], buckets["+Inf"]) == (1, 0, 1, 1)
    assert total == pytest.approx(42, abs=0.01)
    count, total, buckets = histogram("static", "succeeded")
    assert (count, buckets["600"], buckets["1200"]) == (1, 0, 1)
    assert total == pytest.approx(700, abs=0.01)
    count, total, buckets = histogram("dynamic", "failed")  # 3 s and 10 s; the old one is out of the window
    assert (count, buckets["1"], buckets["5"], buckets["10"], buckets["86400"]) == (2, 0, 1, 2, 2)
    assert total == pytest.approx(13, abs=0.01)
    count, total, _ = histogram("dynamic", "cancelled")  # the one cancelled while queued never ran
    assert (count, total) == (1, pytest.approx(5, abs=0.01))
    assert (
        "qaas_job_duration_seconds_count",
        frozenset({("mode", "qat"), ("status", "failed")}),
    ) not in samples

    exits = {
        dict(labels)["reason"]: v for (name, labels), v in samples.items() if name == "qaas_runner_exits"
    }
    assert exits["succeeded"] == 2
    assert exits["cancelled"] == 1
    assert exits["memory_limit"] == 1
    assert exits["other"] == 1  # the hostile code
    assert exits["internal_error"] == 0  # the old failure is out of the window
    assert exits["time_limit"] == exits["worker_lost"] == exits["verification_failed"] == 0

    # The upload bytes this process accepted: the model's and the dataset's (ready_model, ready_dataset).
    for kind, size in (("model", len(b"model bytes")), ("dataset", len(b"dataset bytes"))):
        delta = value(samples, "qaas_upload_bytes_total", kind=kind) - value(
            before, "qaas_upload_bytes_total", kind=kind
        )
        assert delta == size, kind

    # Nothing that names a tenant or an object.
    with session_scope() as session:
        job = session.get(Job, queued)
        assert job is not None
        tenant_id = job.tenant_id
    ids = [
        queued,
        running,
        succeeded,
        static,
        out_of_memory,
        hostile,
        cancelled_queued,
        old,
        model_id,
        dataset_id,
    ]
    for secret in [TENANT, str(tenant_id), *ids]:
        assert secret not in text
    assert not re.search(r"[a-z]+_[0-9a-z]{26}", text)  # no object id of any kind (app.core.ids)


def test_metrics_need_no_key_and_stay_out_of_the_schema(keyed: tuple[TestClient, TestClient]) -> None:
    _, anonymous = keyed
    assert anonymous.get("/v1/capabilities").status_code == 401  # the API itself still needs a key
    text, samples = scrape(anonymous)
    assert value(samples, "qaas_queue_depth") == 0
    assert "# TYPE qaas_job_duration_seconds histogram" in text
    assert "process_cpu_seconds_total" in text
    schema = anonymous.get("/openapi.json").json()
    assert "/metrics" not in schema["paths"]


def test_metrics_answer_503_when_the_database_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on port 1: the connection is refused at once.
    configure(monkeypatch, tmp_path / "var", "postgresql+psycopg://qaas@127.0.0.1:1/qaas")
    with TestClient(create_app()) as client:
        response = client.get("/metrics")
    assert response.status_code == 503
    assert response.json()["error"] == "dependency_unavailable"
    assert "database" in response.json()["detail"]
    assert response.headers["retry-after"] == "5"


def test_every_code_a_job_fails_with_is_an_exit_reason() -> None:
    """A code missing from EXIT_REASONS would be counted as "other": they are the catalogue's job codes, so
    give a new code job=True in qaas/contract/errors.py."""
    raised = {r.code for r in raised_codes() if r.kind is Kind.JOB}
    assert {"time_limit", "memory_limit", "worker_lost", "verification_failed", "runner_crashed"} <= raised
    assert raised - EXIT_REASONS == set()
    assert EXIT_REASONS.isdisjoint({"succeeded", "cancelled", "other"})  # the other values of the label
    assert exit_reason("failed", "zip_bomb") == "other"  # an upload's refusal, never a job's
