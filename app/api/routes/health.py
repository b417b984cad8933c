from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from sqlalchemy import text

from app.api.deps import SessionDep, SettingsDep
from app.core import queue
from app.core.errors import ServiceUnavailable
from app.schemas.common import error_responses
from qaas.support import SUPPORT

router = APIRouter(tags=["service"], responses=error_responses())


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """Answers 200 while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: database and broker reachable", responses=error_responses())
def readyz(session: SessionDep, settings: SettingsDep) -> dict[str, str]:
    """200 when the database and the broker answer; 503 naming what is down."""
    problems = []
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        problems.append(f"database unreachable ({type(exc).__name__})")
    try:
        queue.check_broker(settings.readiness_timeout_s)
    except Exception as exc:
        problems.append(f"broker unreachable ({type(exc).__name__})")
    if problems:
        raise ServiceUnavailable(
            "; ".join(problems) + ": check the service's URLs and that it runs", code="not_ready"
        )
    return {"status": "ready", "database": "ok", "broker": "ok"}


@router.get("/v1/capabilities", summary="What this service can do", responses=error_responses())
def capabilities(settings: SettingsDep) -> dict[str, Any]:
    """Formats, modes and backends supported, and the limits that apply."""
    return {
        "support": {
            fmt: {mode: list(backends) for mode, backends in modes.items() if backends}
            for fmt, modes in SUPPORT.items()
        },
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "job_timeout_s": settings.job_timeout_s},
    }
