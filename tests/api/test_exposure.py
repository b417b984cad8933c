"""What the API gives away: /readyz names the workers only to callers with a key, wrong keys are throttled per
client address, and job lists are summaries whatever a job's size. Through the real app, SQLite and PostgreSQL
(and Redis when QAAS_TEST_REDIS_URL is set)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from app.core import ratelimit
from app.core.db import session_scope
from app.main import create_app
from app.services import reaper
from tests.api.conftest import make_ready_model
from tests.api.test_reports import METRICS, finish_job, submit
from tests.api.test_tenancy import new_key
from tests.conftest import REDIS_URL, require_url, reset_caches

WRONG_KEY = "qaas_key_00000000000000000000000000." + "A" * 43
# A fixed clock 15 s into a minute, so that no count straddles a window (the Retry-After is then 45).
MINUTE_START = 1_800_000_000.0 - 1_800_000_000 % 60


def frozen_clock(monkeypatch: pytest.MonkeyPatch, at: float) -> None:
    monkeypatch.setattr(ratelimit, "time", SimpleNamespace(time=lambda: at))


def client_at(app: FastAPI, address: str, key: str | None = None) -> TestClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return TestClient(app, client=(address, 40000), headers=headers)


@pytest.fixture
def auth_required(service_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("QAAS_AUTH", "required")
    reset_caches()
    yield


def beat_worker() -> None:
    with session_scope() as session:
        reaper.beat(
            session,
            "build-host-7:4242",
            hostname="build-host-7",
            pid=4242,
            concurrency=1,
            sandbox=["rlimit_as"],
            sandbox_gaps={"landlock": "kernel 5.4 has no Landlock", "venv": "/srv/qaas/.venv"},
        )


# --- /readyz ------------------------------------------------------------------------------------------------


def test_readyz_names_the_workers_only_to_a_caller_with_a_key(auth_required: None) -> None:
    beat_worker()
    app = create_app()
    with client_at(app, "198.51.100.1") as anonymous:
        response = anonymous.get("/readyz")
        assert response.status_code == 200
        assert response.json() == {"status": "ready"}
        # A wrong key is no key (and is counted like one sent to /v1).
        assert anonymous.get("/readyz", headers={"X-API-Key": WRONG_KEY}).json() == {"status": "ready"}
    with client_at(app, "198.51.100.2", new_key("team-a")) as keyed:
        body = keyed.get("/readyz").json()
    assert body["status"] == "ready" and body["database"] == "ok" and body["broker"] == "ok"
    [worker] = body["workers"]
    assert worker["id"] == "build-host-7:4242" and worker["sandbox_gaps"]["venv"] == "/srv/qaas/.venv"


def test_readyz_not_ready_keeps_its_503_and_says_why_only_with_a_key(
    auth_required: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.core import queue

    def down(_timeout: float) -> None:
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(queue, "check_broker", down)
    app = create_app()
    with client_at(app, "198.51.100.1") as anonymous:
        response = anonymous.get("/readyz")
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    body = response.json()
    assert body["status"] == "not_ready" and body["error"] == "dependency_unavailable"
    assert "ConnectionRefusedError" not in body["detail"] and "broker unreachable" not in body["detail"]
    with client_at(app, "198.51.100.2", new_key("team-a")) as keyed:
        response = keyed.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "not_ready"
    assert "broker unreachable (ConnectionRefusedError)" in response.json()["detail"]


def test_readyz_without_auth_shows_details_on_loopback_only(
    service_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    beat_worker()
    with TestClient(create_app()) as local:  # QAAS_AUTH=disabled: `qaas api` listens on loopback only
        assert local.get("/readyz").json()["workers"][0]["id"] == "build-host-7:4242"
    monkeypatch.setenv("QAAS_ALLOW_PUBLIC_NO_AUTH", "true")
    reset_caches()
    with TestClient(create_app()) as public:
        assert public.get("/readyz").json() == {"status": "ready"}


# --- failed key attempts ------------------------------------------------------------------------------------


def test_wrong_keys_are_throttled_per_client_address(
    auth_required: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen_clock(monkeypatch, MINUTE_START + 15)
    key = new_key("team-a")
    app = create_app()
    attacker = client_at(app, "203.0.113.9", WRONG_KEY)
    statuses = [attacker.get("/v1/models") for _ in range(25)]
    assert [r.status_code for r in statuses] == [401] * 20 + [429] * 5
    assert {r.json()["error"] for r in statuses[:20]} == {"invalid_api_key"}
    refused = statuses[-1]
    assert refused.json()["error"] == "too_many_failed_attempts"
    assert "QAAS_AUTH_FAILURES_PER_MINUTE" in refused.json()["detail"]
    assert refused.headers["retry-after"] == "45"
    # The address is refused before its key is looked at: a right key from it waits too.
    assert attacker.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 429
    # Other addresses are not slowed, and /readyz stays a probe (no details, same status).
    assert client_at(app, "198.51.100.2", key).get("/v1/models").status_code == 200
    assert attacker.get("/readyz").json() == {"status": "ready"}
    # The window ends: wrong keys are 401 again, a right key works.
    frozen_clock(monkeypatch, MINUTE_START + 61)
    assert attacker.get("/v1/models").status_code == 401
    assert attacker.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    attacker.close()


def test_wrong_keys_sent_to_readyz_count_too(auth_required: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAAS_AUTH_FAILURES_PER_MINUTE", "3")
    reset_caches()
    frozen_clock(monkeypatch, MINUTE_START + 15)
    app = create_app()
    with client_at(app, "203.0.113.10", WRONG_KEY) as guesser:
        for _ in range(3):
            assert guesser.get("/readyz").json() == {"status": "ready"}
        refused = guesser.get("/v1/models")
    assert refused.status_code == 429 and refused.json()["error"] == "too_many_failed_attempts"


@pytest.mark.redis
def test_failed_attempts_are_shared_between_api_instances_through_redis(
    auth_required: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = require_url("QAAS_TEST_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("QAAS_BROKER_URL", url)
    reset_caches()
    frozen_clock(monkeypatch, MINUTE_START + 15)
    address = f"fd00::{uuid.uuid4().hex[:4]}:{uuid.uuid4().hex[:4]}"  # fresh counts in a shared Redis
    first = client_at(create_app(), address, WRONG_KEY)
    assert [first.get("/v1/models").status_code for _ in range(12)] == [401] * 12
    # A second API process: a new app and a new limiter, nothing shared in memory.
    ratelimit.get_limiter.cache_clear()
    assert isinstance(ratelimit.get_limiter(), ratelimit.RedisLimiter)
    second = client_at(create_app(), address, WRONG_KEY)
    statuses = [second.get("/v1/models").status_code for _ in range(10)]
    assert statuses == [401] * 8 + [429] * 2
    assert client_at(create_app(), "198.51.100.3", new_key("team-a")).get("/v1/models").status_code == 200
    first.close()
    second.close()


# --- job lists ----------------------------------------------------------------------------------------------


def test_job_lists_are_summaries_and_the_job_is_whole(client: TestClient, service_env: Path) -> None:
    model_id = make_ready_model(client)
    # A request near QAAS_MAX_JSON_BYTES and metrics with thousands of layers: ~1.5 MB of job.
    exclude = [f"encoder.layer.{i}." + "x" * 1500 for i in range(256)]
    job_id = submit(client, model_id, options={"exclude": exclude})
    layers = [{"name": f"block.{i}.linear", "type": "Linear", "sqnr_db": 30.0} for i in range(20_000)]
    metrics = METRICS | {"layers": {"quantized": 20_000, "float": 0, "per_layer": layers}}
    finish_job(job_id, service_env, metrics)
    queued_id = submit(client, model_id)

    page = client.get("/v1/jobs", params={"limit": 100})
    assert page.status_code == 200
    items = page.json()["items"]
    assert [item["id"] for item in items] == [queued_id, job_id]
    for item in items:
        assert len(json.dumps(item)) < 1500, item
    finished = items[1]
    assert finished["url"] == f"/v1/jobs/{job_id}" and finished["report_url"] == f"/v1/jobs/{job_id}/report"
    assert (finished["status"], finished["backend"]) == ("succeeded", {"requested": "auto", "chosen": "x86"})
    assert (finished["size_ratio"], finished["speedup"], finished["sqnr_db"]) == (3.971, 4.021, 27.41)
    assert finished["accuracy_delta"] == -0.42 and finished["error"] is None
    queued = items[0]
    assert queued["status"] == "queued" and queued["size_ratio"] is None and queued["report_url"] is None
    for absent in ("config", "metrics", "artifacts", "manifest", "runner", "load_snippet"):
        assert absent not in finished

    whole = client.get(finished["url"]).json()
    assert whole["config"]["options"]["exclude"] == exclude
    assert len(whole["metrics"]["layers"]["per_layer"]) == 20_000
    assert [a["name"] for a in whole["artifacts"]] == ["model.int8.ts"]
    assert whole["manifest"]["qaas_engine"] == "0.1.0" and whole["load_snippet"]
    # The comparison of one model's jobs was a summary already.
    compared = client.get(f"/v1/models/{model_id}/jobs").json()["items"]
    assert all(len(json.dumps(item)) < 1500 for item in compared)
