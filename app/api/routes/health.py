from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import ReleasingRoute, SessionDep, SettingsDep
from app.api.guard import CallerDep
from app.core import queue
from app.core.errors import ServiceUnavailable
from app.schemas.common import GUARDED, error_responses
from app.services import quotas, reaper
from qaas.support import SUPPORT

router = APIRouter(route_class=ReleasingRoute, tags=["service"], responses=error_responses())


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """Answers 200 while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker reachable", responses=error_responses())
def readyz(session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """200 when the database and the broker answer, with the workers heard from lately and the runner
    protections each gives its jobs (`sandbox`, and `sandbox_gaps`: why others are off); 503 naming what is
    down. No live worker is not an error here: jobs wait queued until one starts."""
    problems = []
    try:
        session.execute(text("SELECT 1"))
        workers = [
            {
                "id": w.id,
                "last_seen_at": w.last_seen_at,
                "concurrency": w.concurrency,
                "sandbox": w.sandbox,
                "sandbox_gaps": w.sandbox_gaps,
            }
            for w in reaper.live_workers(session, settings)
        ]
    except Exception as exc:
        problems.append(f"database unreachable ({type(exc).__name__})")
    try:
        queue.check_broker(settings.readiness_timeout_s)
    except Exception as exc:
        problems.append(f"broker unreachable ({type(exc).__name__})")
    if problems:
        raise ServiceUnavailable(
            "; ".join(problems) + ": check the service's URLs and that it runs",
            code="dependency_unavailable",
            headers={"Retry-After": "5"},
        )
    return {"status": "ready", "database": "ok", "broker": "ok", "workers": workers}


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
