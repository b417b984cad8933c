from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.deps import ReleasingRoute, SessionDep, SettingsDep
from app.api.guard import CallerDep, key_holder
from app.core import queue
from app.core.config import Settings
from app.schemas.common import GUARDED, Readiness, WorkerOut, error_responses
from app.services import quotas, reaper
from qaas.contract.support import SUPPORT

router = APIRouter(route_class=ReleasingRoute, tags=["service"], responses=error_responses())


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """Answers 200 while the process serves requests."""
    return {"status": "ok"}


def shows_details(request: Request, settings: Settings) -> bool:
    """Whether /readyz may name the workers (host names, PIDs, the runner's paths and sandbox gaps: a map for
    an attacker). With QAAS_AUTH=required, to callers with a valid key. With auth disabled the API listens on
    loopback only unless QAAS_ALLOW_PUBLIC_NO_AUTH (app.commands.check_exposure), so whoever asks has the whole
    API already; with that setting a proxy in front is trusted to guard /v1 but likely leaves the probes open,
    so nobody gets them (each job's `runner` still shows its protections)."""
    if settings.auth == "disabled":
        return not settings.allow_public_no_auth
    return key_holder(request.scope, settings) is not None


@router.get(
    "/readyz",
    summary="Readiness: database and broker reachable",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses=error_responses(),
)
def readyz(request: Request, session: SessionDep, settings: SettingsDep) -> Readiness | JSONResponse:
    """200 `{"status": "ready"}` when the database and the broker answer; 503 with `"status": "not_ready"`
    when one does not. To a caller with an API key (or any caller when auth is disabled on a loopback
    listener) it also names what is down and lists the workers heard from lately with the runner protections
    each gives its jobs (`sandbox`, and `sandbox_gaps`: why others are off). No live worker is not an error
    here: jobs wait queued until one starts."""
    problems = []
    try:
        session.execute(text("SELECT 1"))
        workers = [
            WorkerOut(
                id=w.id,
                last_seen_at=w.last_seen_at,
                concurrency=w.concurrency,
                sandbox=w.sandbox,
                sandbox_gaps=w.sandbox_gaps,
            )
            for w in reaper.live_workers(session, settings)
        ]
    except Exception as exc:
        problems.append(f"database unreachable ({type(exc).__name__})")
    finally:
        session.close()  # before the key check, which takes a connection of its own
    try:
        queue.check_broker(settings.readiness_timeout_s)
    except Exception as exc:
        problems.append(f"broker unreachable ({type(exc).__name__})")
    detailed = shows_details(request, settings)
    if problems:
        # The one error schema, with the probe's `status` beside it.
        detail = "; ".join(problems) if detailed else "the database or the broker is unreachable"
        return JSONResponse(
            {
                "status": "not_ready",
                "error": "dependency_unavailable",
                "detail": detail + ": check the service's URLs and that it runs",
            },
            status_code=503,
            headers={"Retry-After": "5"},
        )
    if not detailed:
        return Readiness(status="ready")
    return Readiness(status="ready", database="ok", broker="ok", workers=workers)


@router.get("/v1/capabilities", summary="What this service can do", responses=error_responses(*GUARDED))
def capabilities(settings: SettingsDep, session: SessionDep, caller: CallerDep) -> dict[str, Any]:
    """Formats, modes and backends supported, the limits that apply, and the caller's tenant with its quotas
    and what it uses of them."""
    max_jobs, max_bytes = quotas.limits(session, settings, caller.tenant_id)
    active = quotas.active_jobs(session, caller.tenant_id)
    return {
        "support": {
            fmt: {mode: list(backends) for mode, backends in modes.items() if backends}
            for fmt, modes in SUPPORT.items()
        },
        "limits": {
            "max_upload_bytes": settings.max_upload_bytes,
            "max_json_bytes": settings.max_json_bytes,
            "job_timeout_s": settings.job_timeout_s,
            "rate_limit_rps": settings.rate_limit_rps if settings.auth == "required" else None,
            "retention_days": settings.retention_days or None,
        },
        "tenant": {
            "name": caller.tenant_name,
            "active_jobs": active,
            "max_active_jobs": max_jobs or None,
            "storage_bytes": quotas.storage_used(session, caller.tenant_id),
            "max_storage_bytes": max_bytes or None,
        },
    }
