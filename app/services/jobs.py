"""Job use cases: create (validated from the database), read, list, cancel; and the worker's side:
claim with a conditional update and a lease, progress, finish, fail.

`create_job` and `cancel_job` are whole requests and commit; the worker's side only flushes, inside the
task's `session_scope()` (app.core.db says why)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, case, func, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer, selectinload

from app.core import queue
from app.core.config import Settings
from app.core.db import after_commit
from app.core.errors import Conflict, Gone, InvalidRequest, NotFound, not_found
from app.core.ids import new_id
from app.models import Artifact, Dataset, Job, JobMetrics, Model
from app.models.common import UTCDateTime, utcnow
from app.schemas.jobs import JobCreate
from app.services import quotas
from app.services.datasets import ready_dataset
from app.services.models import ready_model
from app.services.pagination import paginate
from qaas.contract.formatting import headline_latency
from qaas.contract.metrics import JobMetrics as MetricsDocument
from qaas.contract.shapes import check_shapes_match
from qaas.contract.support import refusal
from qaas.contract.vocab import ACTIVE, DataRole, JobStatus, Mode


def _request_digest(request: JobCreate) -> str:
    return hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def _same_key(tenant_id: str, idempotency_key: str | None) -> Select[Any]:
    return select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == idempotency_key)


def create_job(
    session: Session,
    settings: Settings,
    request: JobCreate,
    idempotency_key: str | None,
    *,
    tenant_id: str,
) -> tuple[Job, bool]:
    """Validate against the stored model and datasets, check the tenant's quotas, insert the job and commit;
    its id is enqueued after the commit.

    Returns (job, created); a repeated Idempotency-Key with the same body returns the first job.
    """
    digest = _request_digest(request)
    if idempotency_key is not None:
        earlier = _earlier_job(session, tenant_id, idempotency_key, digest)
        if earlier is not None:
            return earlier, False
    model = ready_model(session, request.model_id, tenant_id=tenant_id)
    _check_request(model, request)
    for role, dataset_id in _datasets_of(request):
        _check_dataset(model, ready_dataset(session, dataset_id, role, tenant_id=tenant_id), role)
    quotas.check_active_jobs(session, settings, tenant_id)
    quotas.check_storage(session, settings, tenant_id)
    job = _new_job(settings, request, model, tenant_id, idempotency_key, digest)
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        # Two requests with the same Idempotency-Key raced; the loser answers like a repeat.
        session.rollback()
        earlier = session.scalar(_same_key(tenant_id, idempotency_key))
        if earlier is None or earlier.request_sha256 != digest:
            raise
        return earlier, False
    job_id = job.id
    after_commit(session, lambda: queue.enqueue(queue.RUN_JOB, job_id))
    session.commit()
    return job, True


def _earlier_job(session: Session, tenant_id: str, idempotency_key: str, digest: str) -> Job | None:
    """The job a request with this Idempotency-Key created, if any; refused when that request differed."""
    earlier = session.scalar(_same_key(tenant_id, idempotency_key))
    if earlier is not None and earlier.request_sha256 != digest:
        raise Conflict(
            "this Idempotency-Key was already used with a different request body: use a new key",
            code="idempotency_key_reused",
        )
    return earlier


def _check_request(model: Model, request: JobCreate) -> None:
    """The engine serves this format, mode, backend and options, and the mode has the dataset it needs."""
    assert model.format is not None
    reason = refusal(
        model.format,
        request.mode,
        request.backend,
        weight_granularity=request.options.weight_granularity if request.mode != Mode.DYNAMIC else None,
        quantize_embeddings=request.options.quantize_embeddings if request.mode == Mode.DYNAMIC else None,
    )
    if reason:
        raise InvalidRequest(reason, code="unsupported_combination")
    if request.mode == Mode.STATIC and request.calibration_dataset_id is None:
        raise InvalidRequest(
            "static quantization needs calibration data: set calibration_dataset_id", code="dataset_required"
        )
    if request.mode == Mode.QAT and request.train_dataset_id is None:
        raise InvalidRequest(
            "quantization-aware training needs training data: set train_dataset_id", code="dataset_required"
        )


def _datasets_of(request: JobCreate) -> list[tuple[DataRole, str]]:
    """The datasets the request names, by role, in the order they are checked."""
    named = (
        (DataRole.CALIBRATION, request.calibration_dataset_id),
        (DataRole.TRAIN, request.train_dataset_id),
        (DataRole.EVAL, request.eval_dataset_id),
    )
    return [(role, dataset_id) for role, dataset_id in named if dataset_id is not None]


def _check_dataset(model: Model, dataset: Dataset, role: DataRole) -> None:
    """The dataset feeds the model: text for a model with a tokenizer, else arrays of its inputs' shapes; and
    labels for training."""
    assert model.inspection is not None
    if dataset.format == "jsonl":
        # Text is tokenized at job time by the model's own tokenizer: only a Hugging Face upload has one.
        if not (model.inspection.get("hf") or {}).get("tokenizer"):
            raise InvalidRequest(
                f"the {role} dataset {dataset.id} is JSONL text, which needs a Hugging Face model uploaded "
                "with its tokenizer files: upload arrays (.npz) named after the model's inputs instead",
                code="dataset_mismatch",
            )
    else:
        mismatch = check_shapes_match(model.inspection["inputs"], dataset.tensors or {}, role=role)
        if mismatch:
            raise InvalidRequest(mismatch, code="dataset_mismatch")
    if role == DataRole.TRAIN and not dataset.has_labels:
        raise InvalidRequest(
            f"the training dataset {dataset.id} has no 'labels' array: QAT needs labels",
            code="labels_required",
        )


def _new_job(
    settings: Settings,
    request: JobCreate,
    model: Model,
    tenant_id: str,
    idempotency_key: str | None,
    digest: str,
) -> Job:
    """The job row, queued: its config is the request as sent, with the timeout the settings allow."""
    timeout_s = min(request.timeout_s or settings.job_timeout_s, settings.job_timeout_s)
    config = request.model_dump(mode="json", exclude={"model_id"}) | {"timeout_s": timeout_s}
    return Job(
        id=new_id("job"),
        tenant_id=tenant_id,
        model_id=model.id,
        calibration_dataset_id=request.calibration_dataset_id,
        train_dataset_id=request.train_dataset_id,
        eval_dataset_id=request.eval_dataset_id,
        status=JobStatus.QUEUED,
        mode=request.mode,
        backend_requested=request.backend,
        config=config,
        idempotency_key=idempotency_key,
        request_sha256=digest,
        percent=0.0,
        attempts=0,
        message="waiting for a worker",
    )


def get_job(session: Session, job_id: str, *, tenant_id: str) -> Job:
    """The caller's job; another tenant's answers exactly like a missing one."""
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise not_found("job", job_id)
    return job


def list_jobs(
    session: Session,
    *,
    tenant_id: str,
    limit: int,
    cursor: str | None,
    status: str | None,
    model_id: str | None,
) -> tuple[list[Job], str | None]:
    """Jobs as a list shows them: the large JSON columns (request, manifest, runner, the metrics document) are
    not loaded, so a page costs the database and the API what its summaries weigh."""
    query = (
        select(Job)
        .where(Job.tenant_id == tenant_id)
        .options(
            defer(Job.config),
            defer(Job.manifest),
            defer(Job.runner),
            defer(Job.load_snippet),
            selectinload(Job.metrics).defer(JobMetrics.data),
        )
    )
    if status:
        query = query.where(Job.status == status)
    if model_id:
        query = query.where(Job.model_id == model_id)
    return paginate(session, query, Job.id, limit, cursor)


def artifacts_of(session: Session, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, job_id: str, name: str, *, tenant_id: str) -> Artifact:
    get_job(session, job_id, tenant_id=tenant_id)
    artifact = session.scalar(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    if artifact is None:
        names = ", ".join(a.name for a in artifacts_of(session, job_id)) or "none yet"
        raise NotFound(
            f"job {job_id} has no artifact named '{name}' (it has: {names})", code="artifact_not_found"
        )
    if artifact.expired_at is not None:
        raise Gone(
            f"the artifact {name} of job {job_id} was deleted by the retention policy on "
            f"{artifact.expired_at:%Y-%m-%d}: run the job again",
            code="artifact_expired",
        )
    return artifact


def cancel_job(session: Session, job_id: str, *, tenant_id: str) -> Job:
    """Queued jobs end at once; a running job is flagged and its worker stops the runner within seconds.

    One conditional UPDATE, so that a job finishing meanwhile is never flagged after the fact: a read then a
    write could answer 202 for a job that succeeded between the two on SQLite, where FOR UPDATE locks nothing.
    A 202 is a promise that `succeed_job` keeps: a flagged job ends cancelled. Commits."""
    now = utcnow()
    queued = Job.status == JobStatus.QUEUED
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
        .values(
            cancel_requested_at=func.coalesce(Job.cancel_requested_at, literal(now, UTCDateTime())),
            status=case((queued, JobStatus.CANCELLED), else_=Job.status),
            finished_at=case((queued, literal(now, UTCDateTime())), else_=Job.finished_at),
            message=case((queued, "cancelled before it started"), else_="cancelling"),
        )
    )
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.tenant_id != tenant_id:
        raise not_found("job", job_id)
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise Conflict(
            f"job {job_id} has already finished ({job.status}): nothing to cancel", code="job_finished"
        )
    session.commit()
    return job


# --- the worker's side -------------------------------------------------------------------------------------


def claim_job(session: Session, job_id: str, worker_id: str, lease_s: float) -> Job | None:
    """Take a queued job with a conditional update; None when someone else has it or it is finished."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.RUNNING,
            attempts=Job.attempts + 1,
            worker_id=worker_id,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_s),
            stage="loading",
            percent=0.0,
            message="starting the runner",
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.get(Job, job_id, populate_existing=True)


def record_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    lease_s: float,
    stage: str | None,
    percent: float | None,
    message: str | None,
) -> bool:
    """Store progress and extend the lease. Returns True when the job should stop (cancelled or lost)."""
    values: dict[str, Any] = {"lease_expires_at": utcnow() + timedelta(seconds=lease_s)}
    if stage is not None:
        values["stage"] = stage
    if percent is not None:
        values["percent"] = max(0.0, min(100.0, float(percent)))
    if message is not None:
        values["message"] = message[:2000]
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return True
    cancel_at = session.scalar(select(Job.cancel_requested_at).where(Job.id == job_id))
    return cancel_at is not None


def _finish(session: Session, job_id: str, worker_id: str, *conditions: Any, **values: Any) -> bool:
    """End this worker's running job (and any further `conditions`) with `values`; False when it is not."""
    values.setdefault("finished_at", utcnow())
    values["lease_expires_at"] = None
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING, *conditions)
        .values(values)
    )
    return result.rowcount == 1  # type: ignore[attr-defined]


def fail_job(
    session: Session,
    job_id: str,
    worker_id: str,
    code: str,
    message: str,
    *,
    runner: dict[str, Any] | None = None,
) -> bool:
    extra = {"runner": runner} if runner is not None else {}
    return _finish(
        session,
        job_id,
        worker_id,
        status=JobStatus.FAILED,
        error_code=code,
        error_message=message[:4000],
        **extra,
    )


def mark_cancelled(
    session: Session, job_id: str, worker_id: str, *, runner: dict[str, Any] | None = None
) -> bool:
    extra = {"runner": runner} if runner is not None else {}
    return _finish(
        session, job_id, worker_id, status=JobStatus.CANCELLED, message="cancelled while running", **extra
    )


def hand_back(session: Session, job_id: str, worker_id: str, reason: str) -> bool:
    """Give a running job back to the queue (its worker is shutting down) and enqueue it after commit.

    Its attempt still counts (attempts counts claims). False when the job is no longer this worker's."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.RUNNING)
        .values(
            status=JobStatus.QUEUED,
            worker_id=None,
            lease_expires_at=None,
            stage=None,
            percent=0.0,
            message=f"re-queued: {reason}",
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    after_commit(session, lambda: queue.enqueue(queue.RUN_JOB, job_id))
    return True


@dataclass
class StoredArtifact:
    name: str
    format: str
    size_bytes: int
    sha256: str
    storage_key: str


def succeed_job(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    backend: str,
    metrics: dict[str, Any],
    artifacts: list[StoredArtifact],
    load_snippet: str,
    manifest: dict[str, Any],
    runner: dict[str, Any],
) -> bool:
    """Commit metrics and artifacts and mark the job succeeded, all in the caller's one transaction.

    False, with no metrics or artifacts written, when the job is no longer ours, or when a cancel was requested
    (cancel answered 202, so the cancel wins: the job ends cancelled, with its runner's protections); the caller
    then deletes the stored artifacts."""
    finished: datetime = utcnow()
    if not _finish(
        session,
        job_id,
        worker_id,
        Job.cancel_requested_at.is_(None),
        status=JobStatus.SUCCEEDED,
        backend_chosen=backend,
        stage="saving",
        percent=100.0,
        message="done",
        load_snippet=load_snippet,
        manifest=manifest,
        runner=runner,
        finished_at=finished,
    ):
        _finish(
            session,
            job_id,
            worker_id,
            Job.cancel_requested_at.is_not(None),
            status=JobStatus.CANCELLED,
            message="cancelled while its results were being saved: they were dropped",
            runner=runner,
        )
        return False
    session.add_all(
        Artifact(
            id=new_id("art"),
            job_id=job_id,
            name=artifact.name,
            format=artifact.format,
            size_bytes=artifact.size_bytes,
            sha256=artifact.sha256,
            storage_key=artifact.storage_key,
        )
        for artifact in artifacts
    )
    session.add(_metrics_row(job_id, metrics))
    return True


def _metrics_row(job_id: str, metrics: dict[str, Any]) -> JobMetrics:
    """The metrics document, with its headline numbers as columns to compare jobs in SQL (the worker has
    validated it: workers/tasks.py; this raises on one that was not)."""
    document = MetricsDocument.model_validate(metrics)
    size, fidelity, accuracy = document.size, document.fidelity, document.accuracy
    latency = headline_latency(document)  # batch 1, else the first batch size measured
    return JobMetrics(
        job_id=job_id,
        fp32_bytes=size.fp32_bytes,
        int8_bytes=size.int8_bytes,
        size_ratio=size.ratio,
        speedup=latency.speedup if latency else None,
        sqnr_db=fidelity.sqnr_db,
        cosine=fidelity.cosine,
        accuracy_delta=accuracy.delta if accuracy else None,
        data=metrics,
    )
