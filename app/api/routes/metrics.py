"""GET /metrics: Prometheus text exposition. Outside /v1, so it needs no API key (scrapers have none), and
outside the OpenAPI schema; it names no tenant and no object."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import ReleasingRoute, SessionDep
from app.core.metrics import CONTENT_TYPE, exposition
from app.services import metrics as metrics_service

router = APIRouter(route_class=ReleasingRoute)


@router.get("/metrics", include_in_schema=False)
def metrics(session: SessionDep) -> Response:
    """Jobs, queue depth, run times and runner exits from the database; this process's upload bytes."""
    families = metrics_service.job_metrics(session)  # a database outage raises here: 503 (app.main)
    return Response(exposition(families), media_type=CONTENT_TYPE)
