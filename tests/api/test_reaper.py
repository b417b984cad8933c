"""The reaper and the workers' heartbeats, on SQLite and PostgreSQL, with the embedded broker really receiving
the messages (no worker runs here: the test plays the dead worker)."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text, update

from app.core.config import get_settings
from app.core.db import session_scope
from app.core.storage import get_storage
from app.models import Job, Model
from app.models.common import utcnow
from app.services import jobs as job_service
from app.services import reaper
from tests.api.conftest import job_metrics, make_ready_model, upload


def submit(client: TestClient, model_id: str, **headers: str) -> str:
    response = client.post(
        "/v1/jobs", json={"model_id": model_id, "mode": "dynamic", "backend": "fbgemm"}, headers=headers
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def broker_messages(data_dir: Path) -> list[str]:
    """The ids carried by the messages waiting in the embedded (SQLite) broker."""
    engine = create_engine(f"sqlite:///{data_dir / 'broker.sqlite'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT payload FROM kombu_message WHERE visible = 1")).all()
    finally:
        engine.dispose()
    ids = []
    for (payload,) in rows:
        body = json.loads(payload)["body"]
        import base64

        ids.append(json.loads(base64.b64decode(body))[0][0])
    return ids


def claim_and_expire(job_id: str, worker: str = "dead-worker") -> None:
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, worker, 30) is not None
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )


def reap() -> reaper.Reaped:
    with session_scope() as session:
        return reaper.reap(session, get_settings())


def test_an_expired_lease_is_requeued_then_fails_with_worker_lost(
    client: TestClient, service_env: Path
) -> None:
    model_id = make_ready_model(client)
    job_id = submit(client, model_id)
    assert broker_messages(service_env).count(job_id) == 1
    attempts = get_settings().max_attempts
    for attempt in range(1, attempts):
        claim_and_expire(job_id, f"dead-worker-{attempt}")
        assert reap().requeued == [job_id]
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert (job["status"], job["attempts"]) == ("queued", attempt)
        assert f"attempt {attempt} stopped answering" in job["progress"]["message"]
        assert broker_messages(service_env).count(job_id) == 1 + attempt  # the row is the truth, re-sent
    # The last attempt dies while storing its artifacts: they are removed with the failure.
    claim_and_expire(job_id)
    key = f"artifacts/{job_id}/attempt-{attempts}/model.int8.ts"
    partial = service_env / "partial"
    partial.write_bytes(b"half a model")
    get_storage().store_file(partial, key)
    assert reap().lost == [job_id]
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["attempts"], job["error"]["code"]) == ("failed", attempts, "worker_lost")
    assert "QAAS_MAX_ATTEMPTS" in job["error"]["message"]
    assert get_storage().keys_under(f"artifacts/{job_id}/") == []
    assert not reap()  # nothing left to do


def test_a_live_lease_and_a_fresh_queue_are_left_alone(client: TestClient) -> None:
    model_id = make_ready_model(client)
    running, queued = submit(client, model_id), submit(client, model_id)
    with session_scope() as session:
        assert job_service.claim_job(session, running, "alive", 30) is not None
    assert not reap()
    assert client.get(f"/v1/jobs/{running}").json()["status"] == "running"
    assert client.get(f"/v1/jobs/{queued}").json()["status"] == "queued"


def test_a_lease_renewed_after_the_reaper_looked_is_kept(client: TestClient) -> None:
    """The reaper's update names the lease it saw: a worker that renewed it meanwhile keeps its job."""
    job_id = submit(client, make_ready_model(client))
    claim_and_expire(job_id, "slow")
    with session_scope() as session:
        settings = get_settings()
        seen = session.execute(select(Job.lease_expires_at).where(Job.id == job_id)).scalar_one()
        with session_scope() as other:  # the worker's heartbeat lands first
            assert job_service.record_progress(other, job_id, "slow", 30, None, None, None) is False
        reaper._expired_leases(session, settings, utcnow(), found := reaper.Reaped())
        assert seen is not None and found.requeued == []
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_a_lost_job_that_was_being_cancelled_ends_cancelled(client: TestClient) -> None:
    job_id = submit(client, make_ready_model(client))
    claim_and_expire(job_id)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert reap().cancelled == [job_id]
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_stale_queued_jobs_and_inspections_are_enqueued_again(
    client: TestClient, service_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_id = make_ready_model(client)
    stale, fresh = submit(client, model_id), submit(client, model_id)
    inspecting = upload(client, "/v1/models", b"never inspected").json()["id"]
    long_ago = utcnow() - timedelta(hours=1)
    with session_scope() as session:
        session.execute(update(Job).where(Job.id == stale).values(updated_at=long_ago))
        session.execute(update(Model).where(Model.id == inspecting).values(updated_at=long_ago))
    before = broker_messages(service_env)
    found = reap()
    assert (found.reenqueued, found.reinspected) == ([stale], [inspecting])
    after = broker_messages(service_env)
    assert after.count(stale) == before.count(stale) + 1
    assert after.count(fresh) == before.count(fresh)
    assert after.count(inspecting) == before.count(inspecting) + 1
    assert not reap()  # touched: not sent again until QAAS_REQUEUE_AFTER_S has passed once more


def test_hand_back_requeues_a_running_job(client: TestClient, service_env: Path) -> None:
    job_id = submit(client, make_ready_model(client))
    with session_scope() as session:
        assert job_service.claim_job(session, job_id, "w1", 30) is not None
    with session_scope() as session:
        assert not job_service.hand_back(session, job_id, "w2", "not its job")
        assert job_service.hand_back(session, job_id, "w1", "its worker shut down")
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["attempts"]) == ("queued", 1)
    assert job["progress"]["message"] == "re-queued: its worker shut down"
    assert broker_messages(service_env).count(job_id) == 2


def test_heartbeats_are_listed_by_readyz(client: TestClient) -> None:
    assert client.get("/readyz").json()["workers"] == []
    with session_scope() as session:
        reaper.beat(
            session,
            "host:1",
            hostname="host",
            pid=1,
            concurrency=2,
            sandbox=["rlimit_as", "no_network"],
            sandbox_gaps={"unprivileged_user": "not root"},
        )
    [worker] = client.get("/readyz").json()["workers"]
    assert worker["id"] == "host:1" and worker["sandbox"] == ["rlimit_as", "no_network"]
    assert worker["sandbox_gaps"] == {"unprivileged_user": "not root"}
    with session_scope() as session:
        reaper.signed_off(session, "host:1")
    assert client.get("/readyz").json()["workers"] == []
    with session_scope() as session:  # beating again brings it back; silence for 3 intervals drops it
        reaper.beat(session, "host:1", hostname="host", pid=1, concurrency=2, sandbox=[], sandbox_gaps={})
    assert len(client.get("/readyz").json()["workers"]) == 1
    with session_scope() as session:
        session.execute(text("UPDATE worker SET last_seen_at = :t"), {"t": utcnow() - timedelta(minutes=5)})
    assert client.get("/readyz").json()["workers"] == []


def test_concurrent_requests_with_one_idempotency_key_make_one_job(client: TestClient) -> None:
    model_id = make_ready_model(client)
    start = threading.Barrier(4)
    answers: list[str] = []

    def post() -> None:
        start.wait()
        answers.append(submit(client, model_id, **{"Idempotency-Key": "race"}))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 4 and len(set(answers)) == 1
    with session_scope() as session:
        assert session.scalar(select(text("count(*)")).select_from(Job)) == 1


def test_the_embedded_broker_forgets_delivered_messages(client: TestClient, service_env: Path) -> None:
    from app.core import queue

    model_id = make_ready_model(client)
    delivered, waiting = submit(client, model_id), submit(client, model_id)
    engine = create_engine(f"sqlite:///{service_env / 'broker.sqlite'}")
    try:
        with engine.begin() as conn:  # what a worker's delivery leaves: invisible, stamped an hour ago
            rows = conn.execute(text("SELECT id, payload FROM kombu_message")).all()
            [row_id] = [r for r, payload in rows if delivered in payload]
            conn.execute(
                text(
                    "UPDATE kombu_message SET visible = 0, timestamp = datetime('now', '-2 hours') WHERE id = :i"
                ),
                {"i": row_id},
            )
        assert queue.prune_embedded_broker(get_settings()) == 1
        assert queue.prune_embedded_broker(get_settings()) == 0
        payloads = [payload for (payload,) in conn_rows(engine)]
    finally:
        engine.dispose()
    assert not [p for p in payloads if delivered in p]
    assert waiting in broker_messages(service_env)  # a message not yet delivered is never touched


def conn_rows(engine):  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return conn.execute(text("SELECT payload FROM kombu_message")).all()


def test_retention_marks_rows_then_deletes_their_files(
    client: TestClient, service_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.models import Artifact, Dataset
    from tests.api.test_reports import finish_job

    monkeypatch.setenv("QAAS_RETENTION_DAYS", "1")
    get_settings.cache_clear()
    storage = get_storage()
    old_model, busy_model, new_model = (make_ready_model(client) for _ in range(3))
    dataset_id = upload(client, "/v1/datasets", b"calibration").json()["id"]
    done = submit(client, old_model)
    finish_job(done, service_env, job_metrics())
    busy = submit(client, busy_model)
    long_ago = utcnow() - timedelta(days=2)
    with session_scope() as session:
        for cls, object_id in ((Model, old_model), (Model, busy_model), (Dataset, dataset_id)):
            session.execute(update(cls).where(cls.id == object_id).values(created_at=long_ago))
        session.execute(update(Job).where(Job.id == done).values(finished_at=long_ago))
        keys = {
            object_id: session.get(cls, object_id).storage_key  # type: ignore[union-attr]
            for cls, object_id in (
                (Model, old_model),
                (Model, busy_model),
                (Model, new_model),
                (Dataset, dataset_id),
            )
        }
        artifact_key = session.scalars(select(Artifact.storage_key).where(Artifact.job_id == done)).one()
    used_before = client.get("/v1/capabilities").json()["tenant"]["storage_bytes"]

    reaped = reap()
    assert {old_model, dataset_id} <= set(reaped.expired) and len(reaped.expired) == 3
    assert not storage.path(keys[old_model]).exists() and not storage.path(keys[dataset_id]).exists()
    assert not storage.path(artifact_key).exists()
    # In use by a queued job, or young: kept.
    assert storage.path(keys[busy_model]).exists() and storage.path(keys[new_model]).exists()
    assert client.get(f"/v1/models/{busy_model}").json()["status"] == "ready"

    model = client.get(f"/v1/models/{old_model}").json()
    assert model["status"] == "expired"
    assert [m["id"] for m in client.get("/v1/models?status=expired").json()["items"]] == [old_model]
    assert [d["id"] for d in client.get("/v1/datasets?status=expired").json()["items"]] == [dataset_id]
    assert client.get(f"/v1/datasets/{dataset_id}").json()["status"] == "expired"
    gone = client.get(f"/v1/models/{old_model}/file")
    assert gone.status_code == 410 and gone.json()["error"] == "model_expired"
    gone = client.get(f"/v1/jobs/{done}/artifacts/model.int8.ts")
    assert gone.status_code == 410 and gone.json()["error"] == "artifact_expired"
    job = client.get(f"/v1/jobs/{done}").json()
    assert job["status"] == "succeeded" and job["metrics"] is not None  # the record of the job stays
    assert job["artifacts"][0]["expired_at"] is not None
    refused = client.post("/v1/jobs", json={"model_id": old_model, "mode": "dynamic"})
    assert refused.status_code == 409 and refused.json()["error"] == "model_expired"
    used_after = client.get("/v1/capabilities").json()["tenant"]["storage_bytes"]
    assert used_after < used_before

    assert reap().expired == []  # nothing is marked twice
    # Once its job ends, the busy model goes too.
    with session_scope() as session:
        job_service.cancel_job(session, busy, tenant_id="ten_default")
    assert reap().expired == [busy_model]


def test_stale_part_files_are_swept_and_links_never_followed(client: TestClient, service_env: Path) -> None:
    """An API killed mid-upload leaves DATA_DIR/tmp/*.part behind: the reaper deletes those untouched for
    QAAS_STALE_TEMP_AFTER_S, and nothing else."""
    import os

    tmp = service_env / "tmp"
    tmp.mkdir(exist_ok=True)
    outside = service_env.parent / "outside"
    outside.mkdir()
    (outside / "keep.part").write_bytes(b"not ours")
    long_ago = time.time() - get_settings().stale_temp_after_s - 60

    def old(path: Path) -> Path:
        os.utime(path, (long_ago, long_ago), follow_symlinks=False)
        return path

    stale = tmp / "0123abcd.part"
    stale.write_bytes(b"half an upload")
    old(stale)
    fresh = tmp / "4567ef01.part"
    fresh.write_bytes(b"an upload in progress")
    other = tmp / "notes.txt"
    other.write_bytes(b"not a temporary upload")
    old(other)
    link = tmp / "link.part"
    link.symlink_to(outside / "keep.part")
    old(outside / "keep.part")
    old(link)
    folder = tmp / "folder.part"
    folder.mkdir()
    old(folder)

    assert reap().swept == ["0123abcd.part"]
    assert not stale.exists()
    assert fresh.exists() and other.exists() and folder.is_dir()
    assert link.is_symlink() and (outside / "keep.part").read_bytes() == b"not ours"
    assert not reap()  # nothing left to sweep

    # DATA_DIR/tmp itself a link: not followed either.
    link.unlink()
    for path in (fresh, other):
        path.unlink()
    folder.rmdir()
    tmp.rmdir()
    tmp.symlink_to(outside)
    assert reap().swept == []
    assert (outside / "keep.part").exists()
