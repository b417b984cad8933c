from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.core.db import session_scope
from app.core.errors import NotFound
from app.core.storage import get_storage
from app.services import jobs as job_service
from tests.api.conftest import MLP_INSPECTION, job_metrics, make_ready_dataset, make_ready_model, upload


def submit(client: TestClient, **body):
    return client.post("/v1/jobs", json={"mode": "dynamic", "backend": "fbgemm"} | body)


def test_create_get_and_list_job(client: TestClient) -> None:
    model_id = make_ready_model(client)
    response = submit(client, model_id=model_id)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    assert job["backend"] == {"requested": "fbgemm", "chosen": None}
    assert job["config"]["benchmark"]["batch_sizes"] == [1, 8]
    assert job["config"]["timeout_s"] == 3600
    assert job["attempts"] == 0
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
    listed = client.get("/v1/jobs", params={"model_id": model_id, "status": "queued"}).json()
    assert [item["id"] for item in listed["items"]] == [job["id"]]
    assert client.get("/v1/jobs", params={"status": "running"}).json()["items"] == []


def test_model_not_ready_is_409(client: TestClient) -> None:
    model_id = upload(client, "/v1/models", b"abc").json()["id"]
    response = submit(client, model_id=model_id)
    assert response.status_code == 409
    assert response.json()["error"] == "model_not_ready"
    assert client.get("/v1/jobs").json()["items"] == []


def test_unknown_model_is_404(client: TestClient) -> None:
    response = submit(client, model_id="mdl_missing")
    assert response.status_code == 404
    assert response.json()["error"] == "model_not_found"


def test_malformed_bodies_are_422_with_the_error_schema(client: TestClient) -> None:
    model_id = make_ready_model(client)
    cases = [
        {"model_id": model_id, "mode": "turbo"},
        {"model_id": model_id, "mode": "dynamic", "surprise": 1},
        {"model_id": model_id, "mode": "dynamic", "benchmark": {"batch_sizes": [0]}},
        {"model_id": model_id, "mode": "dynamic", "benchmark": {"iterations": 10**9}},
        {"mode": "dynamic"},
    ]
    for body in cases:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"] == "validation_error"
        assert response.json()["detail"]
    not_json = client.post("/v1/jobs", content=b"{", headers={"content-type": "application/json"})
    assert not_json.status_code == 422


def test_unsupported_combination_and_missing_data(client: TestClient) -> None:
    model_id = make_ready_model(client)
    ts_model = make_ready_model(client, MLP_INSPECTION | {"format": "torchscript"})
    qat = submit(client, model_id=ts_model, mode="qat", train_dataset_id="ds_x")
    assert qat.status_code == 422 and qat.json()["error"] == "unsupported_combination"
    assert "QAT needs a .pt2" in qat.json()["detail"]
    per_tensor = submit(
        client, model_id=model_id, mode="static", backend="x86", options={"weight_granularity": "per_tensor"}
    )
    assert per_tensor.status_code == 422 and per_tensor.json()["error"] == "unsupported_combination"
    assert "per_channel" in per_tensor.json()["detail"]
    static = submit(client, model_id=model_id, mode="static")
    assert static.status_code == 422 and static.json()["error"] == "dataset_required"


def test_dataset_shapes_are_checked_against_the_model(client: TestClient) -> None:
    model_id = make_ready_model(client)
    good = make_ready_dataset(client, {"x": {"shape": [64, 16], "dtype": "float32"}})
    wrong = make_ready_dataset(client, {"x": {"shape": [64, 3, 4], "dtype": "float32"}})
    missing = make_ready_dataset(client, {"y": {"shape": [64, 16], "dtype": "float32"}})
    assert submit(client, model_id=model_id, eval_dataset_id=good).status_code == 202
    response = submit(client, model_id=model_id, eval_dataset_id=wrong)
    assert response.status_code == 422
    assert response.json() == {
        "error": "dataset_mismatch",
        "detail": "eval tensor 'x' has shape [64, 3, 4], the model expects [N, 16]",
    }
    assert (
        "no tensor for model input 'x'"
        in submit(client, model_id=model_id, eval_dataset_id=missing).json()["detail"]
    )
    not_ready = upload(client, "/v1/datasets", b"abc").json()["id"]
    response = submit(client, model_id=model_id, eval_dataset_id=not_ready)
    assert response.status_code == 409 and response.json()["error"] == "dataset_not_ready"


def test_idempotency_key(client: TestClient) -> None:
    model_id = make_ready_model(client)
    first = client.post(
        "/v1/jobs", json={"model_id": model_id, "mode": "dynamic"}, headers={"Idempotency-Key": "k1"}
    )
    again = client.post(
        "/v1/jobs", json={"model_id": model_id, "mode": "dynamic"}, headers={"Idempotency-Key": "k1"}
    )
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    other = client.post(
        "/v1/jobs",
        json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"},
        headers={"Idempotency-Key": "k1"},
    )
    assert other.status_code == 409 and other.json()["error"] == "idempotency_key_reused"
    assert len(client.get("/v1/jobs").json()["items"]) == 1


def test_cancel_queued_job_and_conflicts(client: TestClient) -> None:
    model_id = make_ready_model(client)
    job_id = submit(client, model_id=model_id).json()["id"]
    assert client.delete(f"/v1/models/{model_id}").json()["error"] == "model_in_use"
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert response.json()["cancel_requested_at"] is not None
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"] == "job_finished"
    # A cancelled job cannot be claimed by a worker that receives its message late.
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w1", 30) is None
    assert client.delete(f"/v1/models/{model_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404


def test_claim_is_exclusive_and_finish_publishes_artifacts(client: TestClient, service_env: Path) -> None:
    model_id = make_ready_model(client)
    job_id = submit(client, model_id=model_id).json()["id"]
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w1", 30) is not None
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w2", 30) is None
    with session_scope() as session:
        assert (
            job_service.record_progress(session, job_id, "w2", 30, "loading", 5, "x") is True
        )  # not its job
        assert job_service.record_progress(session, job_id, "w1", 30, "converting", 40, "half") is False
    running = client.get(f"/v1/jobs/{job_id}").json()
    assert running["status"] == "running" and running["attempts"] == 1
    assert running["progress"] == {"stage": "converting", "percent": 40.0, "message": "half"}

    content = b"int8 model" * 100
    tmp = service_env / "artifact.bin"
    tmp.write_bytes(content)
    size, sha = get_storage().store_file(tmp, f"artifacts/{job_id}/attempt-1/model.int8.ts")
    artifact = job_service.StoredArtifact(
        "model.int8.ts", "torchscript", size, sha, f"artifacts/{job_id}/attempt-1/model.int8.ts"
    )
    metrics = job_metrics(ratio=4.0, speedup=2.0)
    with session_scope() as session:
        assert not job_service.succeed_job(
            session,
            job_id,
            "w2",
            backend="fbgemm",
            metrics=metrics,
            artifacts=[artifact],
            load_snippet="",
            manifest={},
            runner={},
        )
    with session_scope() as session:
        assert job_service.succeed_job(
            session,
            job_id,
            "w1",
            backend="fbgemm",
            metrics=metrics,
            artifacts=[artifact],
            load_snippet="x",
            manifest={},
            runner={},
        )
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["backend"]["chosen"] == "fbgemm"
    assert job["metrics"]["size"]["ratio"] == 4.0
    assert job["report_url"] == f"/v1/jobs/{job_id}/report"
    assert client.get(job["report_url"]).json()["metrics"] == metrics
    [listed] = job["artifacts"]
    assert listed["sha256"] == hashlib.sha256(content).hexdigest()

    download = client.get(listed["url"])
    assert download.status_code == 200 and download.content == content
    assert download.headers["etag"] == f'"{sha}"'
    assert download.headers["repr-digest"] == f"sha-256=:{base64.b64encode(bytes.fromhex(sha)).decode()}:"
    partial = client.get(listed["url"], headers={"Range": "bytes=0-9"})
    assert partial.status_code == 206 and partial.content == content[:10]
    assert client.get(listed["url"], headers={"If-None-Match": f'"{sha}"'}).status_code == 304
    suffix = client.get(listed["url"], headers={"Range": "bytes=-5"})
    assert suffix.status_code == 206 and suffix.content == content[-5:]
    malformed = client.get(listed["url"], headers={"Range": "pages=1-2"})
    assert malformed.status_code == 400 and malformed.json()["error"] == "malformed_range"
    beyond = client.get(listed["url"], headers={"Range": f"bytes={len(content)}-"})
    assert beyond.status_code == 416 and beyond.json()["error"] == "range_not_satisfiable"
    assert beyond.headers["content-range"] == f"bytes */{len(content)}"
    missing = client.get(f"/v1/jobs/{job_id}/artifacts/nope.bin")
    assert missing.status_code == 404 and "model.int8.ts" in missing.json()["detail"]


def _stored_artifact(job_id: str, data_dir: Path) -> job_service.StoredArtifact:
    source = data_dir / f"{job_id}.bin"
    source.write_bytes(b"int8 model" * 100)
    key = f"artifacts/{job_id}/attempt-1/model.int8.ts"
    size, sha = get_storage().store_file(source, key)
    return job_service.StoredArtifact("model.int8.ts", "torchscript", size, sha, key)


def _succeed(job_id: str, data_dir: Path) -> bool:
    with session_scope() as session:
        return job_service.succeed_job(
            session,
            job_id,
            "w1",
            backend="fbgemm",
            metrics=job_metrics(),
            artifacts=[_stored_artifact(job_id, data_dir)],
            load_snippet="x",
            manifest={},
            runner={"sandbox": ["rlimits"]},
        )


def test_a_cancel_answered_202_wins_over_a_late_success(client: TestClient, service_env: Path) -> None:
    """Cancel in the job's last seconds: the runner's success arrives after the 202 and is dropped."""
    from sqlalchemy import func, select

    from app.models import Artifact, JobMetrics

    job_id = submit(client, model_id=make_ready_model(client)).json()["id"]
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w1", 30) is not None
    cancel = client.post(f"/v1/jobs/{job_id}/cancel")
    assert cancel.status_code == 202 and cancel.json()["status"] == "running"
    assert _succeed(job_id, service_env) is False
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert job["runner"] == {"sandbox": ["rlimits"]}
    assert job["artifacts"] == [] and job["metrics"] is None and job["report_url"] is None
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Artifact)) == 0
        assert session.scalar(select(func.count()).select_from(JobMetrics)) == 0
    again = client.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and again.json()["error"] == "job_finished"

    # The other order: a success committed first; the cancel that comes after it is refused, not answered 202.
    done_id = submit(client, model_id=make_ready_model(client)).json()["id"]
    with session_scope() as session:
        assert job_service.claim_job(session, done_id, "w1", 30) is not None
    assert _succeed(done_id, service_env) is True
    late = client.post(f"/v1/jobs/{done_id}/cancel")
    assert late.status_code == 409 and late.json()["error"] == "job_finished"
    assert "succeeded" in late.json()["detail"]
    job = client.get(f"/v1/jobs/{done_id}").json()
    assert job["status"] == "succeeded" and job["cancel_requested_at"] is None
    assert [a["name"] for a in job["artifacts"]] == ["model.int8.ts"]


def test_cancel_is_scoped_and_keeps_the_first_request_time(client: TestClient) -> None:
    job_id = submit(client, model_id=make_ready_model(client)).json()["id"]
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w1", 30) is not None
    first = client.post(f"/v1/jobs/{job_id}/cancel").json()
    second = client.post(f"/v1/jobs/{job_id}/cancel")
    assert second.status_code == 202
    assert second.json()["cancel_requested_at"] == first["cancel_requested_at"]
    assert second.json()["progress"]["message"] == "cancelling"
    with session_scope() as session, pytest.raises(NotFound) as other_tenant:
        job_service.cancel_job(session, job_id, tenant_id="ten_other")
    assert other_tenant.value.code == "job_not_found"
    missing = client.post("/v1/jobs/job_missing/cancel")
    assert missing.status_code == 404 and missing.json()["error"] == "job_not_found"
