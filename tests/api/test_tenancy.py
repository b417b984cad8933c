"""Tenants and API keys: nobody sees what is not theirs, missing or bad keys are refused before anything is
read, quotas and the request rate answer 429. SQLite and PostgreSQL, through the real app."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.main import create_app
from app.services import auth
from app.services import datasets as dataset_service
from app.services import models as model_service
from tests.api.conftest import MLP_INSPECTION, job_metrics
from tests.api.test_reports import finish_job
from tests.conftest import REDIS_URL, require_url, reset_caches

FEATURES = {"x": {"shape": [8, 16], "dtype": "float32"}}
METRICS = job_metrics(ratio=4.0)


def new_key(tenant: str) -> str:
    with session_scope() as session:
        return auth.create_key(session, tenant, "test")[1]


@pytest.fixture
def keyed(service_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, TestClient]]:
    """Two tenants' clients on one app with QAAS_AUTH=required, and one client with no key."""
    monkeypatch.setenv("QAAS_AUTH", "required")
    reset_caches()
    app = create_app()
    keys = {"a": new_key("team-a"), "b": new_key("team-b")}
    clients = {
        name: TestClient(app, headers={"Authorization": f"Bearer {key}"}) for name, key in keys.items()
    }
    clients["anonymous"] = TestClient(app)
    yield clients
    for client in clients.values():
        client.close()


def ready_model(client: TestClient) -> str:
    response = client.post("/v1/models", files={"file": ("m.pt2", b"model bytes")})
    assert response.status_code == 201, response.text
    model_id = response.json()["id"]
    with session_scope() as session:
        model_service.record_inspection(session, model_id, result=MLP_INSPECTION, error=None)
    return str(model_id)


def ready_dataset(client: TestClient) -> str:
    response = client.post("/v1/datasets", files={"file": ("d.npz", b"dataset bytes")})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    result = {"format": "npz", "num_samples": 8, "tensors": FEATURES, "has_labels": False}
    with session_scope() as session:
        dataset_service.record_inspection(session, dataset_id, result=result, error=None)
    return str(dataset_id)


def submit(client: TestClient, model_id: str, **extra: Any) -> httpx.Response:
    return client.post(
        "/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"} | extra
    )


def test_another_tenants_objects_answer_404_like_missing_ones(
    keyed: dict[str, TestClient], service_env: Path
) -> None:
    a, b = keyed["a"], keyed["b"]
    model_id, dataset_id = ready_model(a), ready_dataset(a)
    response = submit(a, model_id, eval_dataset_id=dataset_id)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    finish_job(job_id, service_env, METRICS)
    queued_id = submit(a, model_id).json()["id"]
    assert a.get(f"/v1/jobs/{job_id}/artifacts/model.int8.ts").status_code == 200

    reads = {
        f"/v1/models/{model_id}": "model_not_found",
        f"/v1/models/{model_id}/file": "model_not_found",
        f"/v1/models/{model_id}/jobs": "model_not_found",
        f"/v1/models/{model_id}/jobs.html": "model_not_found",
        f"/v1/datasets/{dataset_id}": "dataset_not_found",
        f"/v1/jobs/{job_id}": "job_not_found",
        f"/v1/jobs/{job_id}/report": "job_not_found",
        f"/v1/jobs/{job_id}/report.html": "job_not_found",
        f"/v1/jobs/{job_id}/artifacts/model.int8.ts": "job_not_found",
    }
    for path, code in reads.items():
        theirs = b.get(path)
        missing = b.get(path.replace(path.split("/")[3], path.split("/")[3][:-3] + "zzz"))
        assert theirs.status_code == 404, (path, theirs.text)
        assert theirs.json()["error"] == code == missing.json()["error"], path
        # Same words as for an id that does not exist: nothing tells B that A's object is there.
        assert theirs.json()["detail"].replace(path.split("/")[3], "ID") == missing.json()["detail"].replace(
            path.split("/")[3][:-3] + "zzz", "ID"
        )
    for response in (
        b.post(f"/v1/jobs/{queued_id}/cancel"),
        b.delete(f"/v1/models/{model_id}"),
        b.delete(f"/v1/datasets/{dataset_id}"),
        submit(b, model_id),
    ):
        assert response.status_code == 404, response.text
    own_model = ready_model(b)
    refused = submit(b, own_model, eval_dataset_id=dataset_id)
    assert refused.status_code == 404 and refused.json()["error"] == "dataset_not_found"

    for path in ("/v1/models", "/v1/datasets", "/v1/jobs", f"/v1/jobs?model_id={model_id}"):
        theirs = {item["id"] for item in b.get(path).json()["items"]}
        mine = {item["id"] for item in a.get(path).json()["items"]}
        assert not theirs & {model_id, dataset_id, job_id, queued_id}, path
        assert mine & {model_id, dataset_id, job_id, queued_id}, path
    assert b.get("/v1/models").json()["items"][0]["id"] == own_model
    # A's objects are untouched by B's attempts.
    assert a.get(f"/v1/jobs/{queued_id}").json()["status"] == "queued"
    assert a.get(f"/v1/models/{model_id}").status_code == 200
    assert b.get("/v1/capabilities").json()["tenant"]["name"] == "team-b"


def test_no_key_a_wrong_key_and_a_revoked_key_are_401(keyed: dict[str, TestClient]) -> None:
    anonymous = keyed["anonymous"]
    for path in ("/v1/models", "/v1/jobs", "/v1/capabilities", "/v1/jobs/job_x/report.html"):
        response = anonymous.get(path)
        assert response.status_code == 401, path
        assert response.json()["error"] == "unauthenticated"
        assert response.headers["www-authenticate"] == "Bearer"
    # Liveness, readiness and the docs stay open: probes and people need them without a key.
    assert anonymous.get("/healthz").status_code == 200
    assert anonymous.get("/docs").status_code == 200
    assert anonymous.get("/openapi.json").status_code == 200

    key = new_key("team-c")
    assert anonymous.get("/v1/models", headers={"X-API-Key": key}).status_code == 200
    assert anonymous.get("/v1/models", headers={"Authorization": f"bearer {key}"}).status_code == 200
    key_id = key.removeprefix("qaas_").split(".")[0]
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for bad in (wrong_secret, "qaas_key_00000000000000000000000000." + "A" * 43, "not-a-key", key + "x"):
        response = anonymous.get("/v1/models", headers={"Authorization": f"Bearer {bad}"})
        assert response.status_code == 401, bad
        assert response.json()["error"] == "invalid_api_key"
    with session_scope() as session:
        auth.revoke_key(session, key_id)
    response = anonymous.get("/v1/models", headers={"X-API-Key": key})
    assert response.status_code == 401 and response.json()["error"] == "invalid_api_key"
    # An unauthenticated upload is refused without a row or a stored file.
    response = anonymous.post("/v1/models", files={"file": ("m.pt2", b"x" * 10_000)})
    assert response.status_code == 401
    assert keyed["a"].get("/v1/models").json()["items"] == []


def test_one_idempotency_key_in_two_tenants_makes_two_jobs(keyed: dict[str, TestClient]) -> None:
    a, b = keyed["a"], keyed["b"]
    ids = []
    for client in (a, b, a):
        model_id = ready_model(client) if client is not a or not ids else ids[0][1]
        response = client.post(
            "/v1/jobs",
            json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"},
            headers={"Idempotency-Key": "nightly-1"},
        )
        assert response.status_code == 202, response.text
        ids.append((response.json()["id"], model_id))
    assert ids[0][0] != ids[1][0] and ids[0][0] == ids[2][0]


def test_job_quota(keyed: dict[str, TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAAS_QUOTA_ACTIVE_JOBS", "2")
    from app.core.config import get_settings

    get_settings.cache_clear()
    a, b = keyed["a"], keyed["b"]
    model_id = ready_model(a)
    first, second = submit(a, model_id).json()["id"], submit(a, model_id).json()["id"]
    refused = submit(a, model_id)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"] == "job_quota_exceeded"
    assert "2 jobs queued or running" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) > 0
    assert submit(b, ready_model(b)).status_code == 202  # another tenant has its own quota
    assert a.post(f"/v1/jobs/{first}/cancel").status_code == 202
    assert submit(a, model_id).status_code == 202
    assert {second} <= {job["id"] for job in a.get("/v1/jobs?status=queued").json()["items"]}
    usage = a.get("/v1/capabilities").json()["tenant"]
    assert usage["active_jobs"] == 2 and usage["max_active_jobs"] == 2


def test_storage_quota(
    keyed: dict[str, TestClient], monkeypatch: pytest.MonkeyPatch, service_env: Path
) -> None:
    monkeypatch.setenv("QAAS_QUOTA_STORAGE_BYTES", "25000")
    from app.core.config import get_settings

    get_settings.cache_clear()
    a, b = keyed["a"], keyed["b"]
    assert a.post("/v1/datasets", files={"file": ("d.npz", b"x" * 20_000)}).status_code == 201
    refused = a.post("/v1/datasets", files={"file": ("d.npz", b"y" * 10_000)})
    assert refused.status_code == 429, refused.text
    body = refused.json()
    assert body["error"] == "storage_quota_exceeded"
    assert "stores 20000 bytes" in body["detail"] and "25000" in body["detail"]
    assert len(a.get("/v1/datasets").json()["items"]) == 1
    assert list((service_env / "tmp").glob("*")) == []  # the refused upload left nothing behind
    assert b.post("/v1/datasets", files={"file": ("d.npz", b"y" * 10_000)}).status_code == 201
    # A job's artifacts count too: with the quota full, submitting waits for room.
    model_id = ready_model(b)
    monkeypatch.setenv("QAAS_QUOTA_STORAGE_BYTES", "10000")
    get_settings.cache_clear()
    refused = submit(b, model_id)
    assert refused.status_code == 429 and refused.json()["error"] == "storage_quota_exceeded"


def test_request_rate_per_key(keyed: dict[str, TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QAAS_RATE_LIMIT_RPS", "5")
    from app.core.config import get_settings

    get_settings.cache_clear()
    statuses = [keyed["a"].get("/v1/models").status_code for _ in range(30)]
    assert 429 in statuses
    # 30 requests take far less than 3 s here: at most three one-second windows of 5.
    assert 5 <= statuses.count(200) <= 15, statuses
    limited = keyed["a"].get("/v1/models")
    if limited.status_code == 429:
        assert limited.json()["error"] == "rate_limited" and limited.headers["retry-after"] == "1"
    assert keyed["b"].get("/v1/models").status_code == 200  # per key: B is not slowed by A
    time.sleep(1.1)
    assert keyed["a"].get("/v1/models").status_code == 200


@pytest.mark.redis
def test_redis_rate_limit_is_shared_between_api_processes() -> None:
    from app.core.ratelimit import RedisLimiter

    url = require_url("QAAS_TEST_REDIS_URL", REDIS_URL)
    first, second = RedisLimiter(url), RedisLimiter(url)  # two API processes' limiters
    key = f"key_test{time.time_ns()}"
    # Align to the start of a second so that all ten hits share one window.
    time.sleep(1 - time.time() % 1 + 0.01)
    results = [(first if i % 2 else second).hit(key, 6) for i in range(10)]
    assert results.count(True) == 6 and results[6:] == [False] * 4
    assert RedisLimiter("redis://127.0.0.1:1/0").hit(key, 1)  # Redis unreachable: let requests through


def test_large_non_upload_bodies_are_413(keyed: dict[str, TestClient]) -> None:
    a = keyed["a"]
    big = {"model_id": "mdl_x", "mode": "dynamic", "options": {"exclude": ["x" * 1000] * 2000}}
    response = a.post("/v1/jobs", json=big)
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model_id": "'
        for _ in range(2000):
            yield b"x" * 1000
        yield b'"}'

    response = a.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"] == "body_too_large"


def test_security_schemes_and_guarded_statuses_are_in_the_schema(keyed: dict[str, TestClient]) -> None:
    schema = keyed["anonymous"].get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert {"401", "429"} <= set(operation["responses"]), (method, path)
                assert operation.get("security"), (method, path)


def test_cli_keys_create_list_revoke(service_env: Path) -> None:
    env_cmd = [sys.executable, "-m", "qaas", "keys", "--data-dir", str(service_env)]
    created = subprocess.run(
        [*env_cmd, "create", "--tenant", "ml-team", "--name", "ci"],
        capture_output=True,
        text=True,
        check=True,
    )
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("qaas_key_")
    with session_scope() as session:
        caller = auth.check_key(session, key)
    assert caller is not None and caller.tenant_name == "ml-team"
    key_id = caller.key_id
    listed = subprocess.run([*env_cmd, "list"], capture_output=True, text=True, check=True).stdout
    assert key_id in listed and "ml-team" in listed and key.split(".")[1] not in listed
    subprocess.run([*env_cmd, "revoke", str(key_id)], capture_output=True, text=True, check=True)
    with session_scope() as session:
        assert auth.check_key(session, key) is None
    bad = subprocess.run([*env_cmd, "create", "--tenant", "Bad Name"], capture_output=True, text=True)
    assert bad.returncode == 1 and "tenant name" in bad.stderr
    quota = [sys.executable, "-m", "qaas", "tenants", "--data-dir", str(service_env)]
    subprocess.run([*quota, "quota", "ml-team", "--max-active-jobs", "3"], check=True, capture_output=True)
    listed = subprocess.run([*quota, "list"], capture_output=True, text=True, check=True).stdout
    assert "ml-team" in listed and "0/3" in listed


def test_the_api_refuses_a_public_address_without_auth(tmp_path: Path) -> None:
    env = {"QAAS_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "QAAS_AUTH": "disabled"}
    refused = subprocess.run(
        [sys.executable, "-m", "qaas", "api", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert refused.returncode == 2 and "QAAS_AUTH=required" in refused.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_unauthenticated_upload_is_refused_before_its_body_is_read(service_env: Path) -> None:
    """A real server: the client declares 1 GB and sends 1 MB; the answer is 401 at once, nothing is stored."""
    port = _free_port()
    env = {
        "QAAS_DATA_DIR": str(service_env),
        "QAAS_AUTH": "required",
        "PATH": "/usr/bin:/bin",
        "QAAS_DATABASE_URL": "",
        "QAAS_BROKER_URL": "",
    }
    from app.core.config import get_settings

    env["QAAS_DATABASE_URL"] = get_settings().resolved_database_url
    server = subprocess.Popen(
        [sys.executable, "-m", "qaas", "api", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b'Content-Length: 1073741824\r\n\r\n--b\r\nContent-Disposition: form-data; name="file"; '
                b'filename="m.pt2"\r\n\r\n'
            )
            started = time.monotonic()
            try:
                for _ in range(16):
                    sock.sendall(b"\0" * 65536)
            except OSError:
                pass  # the server may close the connection while we still send: it read enough
            answer = ""
            while "}" not in answer:
                chunk = sock.recv(65536).decode("latin-1")
                if not chunk:
                    break
                answer += chunk
            assert answer.startswith("HTTP/1.1 401"), answer[:200]
            assert "unauthenticated" in answer
            assert time.monotonic() - started < 5
        stored = [p for p in service_env.rglob("*") if p.is_file() and "sqlite" not in p.name]
        assert stored == [], stored
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_key_that_cannot_be_checked_is_503_not_500(
    keyed: dict[str, TestClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database gone while the gate checks a key: 503 dependency_unavailable, never a 500."""
    monkeypatch.setenv("QAAS_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    reset_caches()
    response = keyed["a"].get("/v1/models")
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "dependency_unavailable"
    assert response.headers["retry-after"] == "5"
