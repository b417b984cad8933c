from __future__ import annotations

import base64
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response, status
from fastapi.responses import FileResponse

from app.api.deps import ReleasingRoute, SessionDep, SettingsDep, StorageDep, require_broker
from app.api.guard import CallerDep
from app.api.routes.common import CursorQuery, LimitQuery, file_response
from app.models import Job
from app.schemas.common import GUARDED, ObjectError, Page, error_responses
from app.schemas.jobs import ArtifactOut, BackendOut, JobCreate, JobOut, JobReport, JobSummary, Progress
from app.services import jobs as service
from app.services import reports
from qaas.contract.vocab import JobStatus

router = APIRouter(
    route_class=ReleasingRoute, prefix="/v1/jobs", tags=["jobs"], responses=error_responses(*GUARDED)
)


def _job_error(job: Job) -> ObjectError | None:
    return ObjectError(code=job.error_code, message=job.error_message or "") if job.error_code else None


def _report_url(job: Job) -> str | None:
    return f"/v1/jobs/{job.id}/report" if job.metrics is not None else None


def job_summary(job: Job) -> JobSummary:
    m = job.metrics
    return JobSummary(
        id=job.id,
        url=f"/v1/jobs/{job.id}",
        model_id=job.model_id,
        status=job.status,
        mode=job.mode,
        backend=BackendOut(requested=job.backend_requested, chosen=job.backend_chosen),
        progress=Progress(stage=job.stage, percent=job.percent, message=job.message),
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=_job_error(job),
        size_ratio=m.size_ratio if m else None,
        speedup=m.speedup if m else None,
        sqnr_db=m.sqnr_db if m else None,
        accuracy_delta=m.accuracy_delta if m else None,
        report_url=_report_url(job),
    )


def job_out(job: Job, artifacts: list[Any]) -> JobOut:
    return JobOut(
        id=job.id,
        model_id=job.model_id,
        calibration_dataset_id=job.calibration_dataset_id,
        train_dataset_id=job.train_dataset_id,
        eval_dataset_id=job.eval_dataset_id,
        status=job.status,
        mode=job.mode,
        backend=BackendOut(requested=job.backend_requested, chosen=job.backend_chosen),
        config=job.config,
        progress=Progress(stage=job.stage, percent=job.percent, message=job.message),
        attempts=job.attempts,
        cancel_requested_at=job.cancel_requested_at,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=_job_error(job),
        metrics=job.metrics.data if job.metrics is not None else None,
        artifacts=[
            ArtifactOut(
                name=a.name,
                format=a.format,
                size_bytes=a.size_bytes,
                sha256=a.sha256,
                url=f"/v1/jobs/{job.id}/artifacts/{a.name}",
                expired_at=a.expired_at,
            )
            for a in artifacts
        ],
        load_snippet=job.load_snippet,
        runner=job.runner,
        manifest=job.manifest,
        report_url=_report_url(job),
        report_html_url=f"/v1/jobs/{job.id}/report.html" if job.metrics is not None else None,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    summary="Submit a quantization job",
    responses=error_responses(400, 404, 409),
)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Checks the model and datasets (ready, shapes, what the mode needs), records the job and queues it.
    Poll the job until `status` is succeeded, failed or cancelled. A repeated `Idempotency-Key` returns the
    first job."""
    require_broker(settings)
    job, _created = service.create_job(session, settings, body, idempotency_key, tenant_id=caller.tenant_id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(job, service.artifacts_of(session, job.id))


@router.get("", response_model=Page[JobSummary], summary="List jobs")
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
    status: JobStatus | None = None,
    model_id: str | None = None,
) -> Page[JobSummary]:
    """Jobs, newest first, filtered by status and model, as summaries: status, progress, error and headline
    numbers. GET a job's `url` for its config, metrics, artifacts and manifest."""
    rows, next_cursor = service.list_jobs(
        session, tenant_id=caller.tenant_id, limit=limit, cursor=cursor, status=status, model_id=model_id
    )
    return Page[JobSummary](items=[job_summary(job) for job in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, summary="Get a job", responses=error_responses(404))
def get_job(job_id: str, session: SessionDep, caller: CallerDep) -> JobOut:
    """Status, progress, metrics, artifacts and, on failure, `error` with a stable code."""
    job = service.get_job(session, job_id, tenant_id=caller.tenant_id)
    return job_out(job, service.artifacts_of(session, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobOut,
    summary="Cancel a job",
    responses=error_responses(404, 409),
)
def cancel_job(job_id: str, session: SessionDep, caller: CallerDep) -> JobOut:
    """A queued job is cancelled at once; a running one within seconds (its runner is stopped)."""
    job = service.cancel_job(session, job_id, tenant_id=caller.tenant_id)
    return job_out(job, service.artifacts_of(session, job_id))


@router.get(
    "/{job_id}/report",
    summary="The job's full metrics",
    # Documented with its schema, sent as stored: the document the worker validated (workers/tasks.py).
    response_model=None,
    responses={200: {"model": JobReport, "description": "The report."}, **error_responses(404)},
)
def get_report(job_id: str, session: SessionDep, caller: CallerDep) -> dict[str, Any]:
    """Metrics, configuration and manifest of a finished job."""
    job = reports.get_reported_job(session, job_id, tenant_id=caller.tenant_id)
    assert job.metrics is not None
    return {
        "job_id": job.id,
        "mode": job.mode,
        "backend": {"requested": job.backend_requested, "chosen": job.backend_chosen},
        "config": job.config,
        "metrics": job.metrics.data,
        "manifest": job.manifest,
    }


@router.get(
    "/{job_id}/artifacts/{name}",
    summary="Download an artifact",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The file; Range requests supported.",
        },
        304: {"description": "Not modified (If-None-Match matched the ETag)"},
        **error_responses(400, 404, 410, 416),
    },
)
def download_artifact(
    job_id: str, name: str, request: Request, session: SessionDep, storage: StorageDep, caller: CallerDep
) -> Response:
    """Streams the file with `ETag` (its sha256) and `Repr-Digest: sha-256=:…:` (RFC 9530); 410 once the
    retention policy deleted it."""
    artifact = service.get_artifact(session, job_id, name, tenant_id=caller.tenant_id)
    etag = f'"{artifact.sha256}"'
    digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    headers = {"etag": etag, "repr-digest": f"sha-256=:{digest}:", "cache-control": "private, max-age=0"}
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return file_response(
        storage,
        artifact.storage_key,
        request,
        size=artifact.size_bytes,
        filename=artifact.name,
        headers=headers,
    )
