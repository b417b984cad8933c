"""Pages for people: a job's report and a model's jobs side by side, plus the comparison as JSON.

The pages are self-contained (inline CSS and SVG, no script, nothing fetched): users run qaas behind
firewalls. Every value on them comes from an uploaded model or a job request, so Jinja autoescapes all of it
and a Content-Security-Policy forbids scripts and outside requests should anything slip through.
"""

from __future__ import annotations

from functools import lru_cache

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from app.api.deps import ReleasingRoute, SessionDep
from app.api.guard import CallerDep
from app.api.routes.common import CursorQuery, LimitQuery
from app.models import Job
from app.models.common import utcnow
from app.schemas.common import GUARDED, ErrorBody, Page, error_responses
from app.schemas.jobs import BackendOut
from app.schemas.reports import ModelJobOut
from app.services import reports as service
from app.services.jobs import artifacts_of
from qaas.contract.formatting import PAGE

router = APIRouter(route_class=ReleasingRoute, responses=error_responses())

PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def html_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """error_responses() for a route that answers HTML: FastAPI would file the error schema under text/html,
    while errors are JSON here as everywhere."""
    responses: dict[int | str, dict[str, object]] = {
        200: {"content": {"text/html": {}}, "description": "A self-contained HTML page."}
    }
    for status, spec in error_responses(*statuses).items():
        schema = {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}
        responses[status] = {
            "description": spec["description"],
            "content": {"application/json": {"schema": schema}},
        }
    return responses


@lru_cache
def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("app", "templates"),
        autoescape=True,  # every value shown is user-influenced
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        times=PAGE.times,
        db=PAGE.db,
        cosine=PAGE.cosine,
        pp=PAGE.pp,
        percent=PAGE.percent,
        ms=PAGE.ms,
        bytes=PAGE.bytes,
        cell=PAGE.cell,
    )
    return env


def _page(template: str, **context: object) -> HTMLResponse:
    html = templates().get_template(template).render(generated_at=utcnow(), **context)
    return HTMLResponse(html, headers=PAGE_HEADERS)


def model_job_out(job: Job) -> ModelJobOut:
    m = job.metrics
    reported = m is not None
    return ModelJobOut(
        id=job.id,
        status=job.status,
        mode=job.mode,
        backend=BackendOut(requested=job.backend_requested, chosen=job.backend_chosen),
        error_code=job.error_code,
        fp32_bytes=m.fp32_bytes if m else None,
        int8_bytes=m.int8_bytes if m else None,
        size_ratio=m.size_ratio if m else None,
        speedup=m.speedup if m else None,
        sqnr_db=m.sqnr_db if m else None,
        cosine=m.cosine if m else None,
        accuracy_delta=m.accuracy_delta if m else None,
        created_at=job.created_at,
        finished_at=job.finished_at,
        url=f"/v1/jobs/{job.id}",
        report_url=f"/v1/jobs/{job.id}/report" if reported else None,
        report_html_url=f"/v1/jobs/{job.id}/report.html" if reported else None,
    )


@router.get(
    "/v1/jobs/{job_id}/report.html",
    tags=["jobs"],
    response_class=HTMLResponse,
    summary="The job's report page",
    responses=html_responses(404, *GUARDED),
)
def job_report_page(job_id: str, session: SessionDep, caller: CallerDep) -> HTMLResponse:
    """Headline numbers, latency and per-layer SQNR charts, warnings, environment, configuration, manifest,
    artifacts and the load snippet, as one page that loads nothing else. 404 `report_not_found` until the
    job has metrics."""
    job = service.get_reported_job(session, job_id, tenant_id=caller.tenant_id)
    return _page(
        "report.html", job=job, artifacts=artifacts_of(session, job.id), **service.report_context(job)
    )


@router.get(
    "/v1/models/{model_id}/jobs",
    tags=["models"],
    response_model=Page[ModelJobOut],
    summary="Compare a model's jobs",
    responses=error_responses(404, *GUARDED),
)
def list_model_jobs(
    model_id: str, session: SessionDep, caller: CallerDep, limit: LimitQuery = 100, cursor: CursorQuery = None
) -> Page[ModelJobOut]:
    """The model's jobs, newest first, side by side: mode, backend, size ×, speedup ×, fidelity, accuracy."""
    _model, jobs, next_cursor = service.model_jobs(
        session, model_id, tenant_id=caller.tenant_id, limit=limit, cursor=cursor
    )
    return Page[ModelJobOut](items=[model_job_out(job) for job in jobs], next_cursor=next_cursor)


@router.get(
    "/v1/models/{model_id}/jobs.html",
    tags=["models"],
    response_class=HTMLResponse,
    summary="The model's page: its jobs side by side",
    responses=html_responses(404, *GUARDED),
)
def model_jobs_page(
    model_id: str, session: SessionDep, caller: CallerDep, limit: LimitQuery = 100, cursor: CursorQuery = None
) -> HTMLResponse:
    """The comparison as a table, the best value of each column marked, each row linking to its report."""
    model, jobs, next_cursor = service.model_jobs(
        session, model_id, tenant_id=caller.tenant_id, limit=limit, cursor=cursor
    )
    return _page(
        "model_jobs.html",
        model=model,
        rows=[model_job_out(job) for job in jobs],
        best=service.best_jobs(jobs),
        next_cursor=next_cursor,
        limit=limit,
    )
