"""Per-tenant quotas: jobs queued or running at once, and bytes stored (uploads and artifacts).

A tenant row's own limits win over the settings' defaults; 0 means no limit. Over a quota the API answers 429
with Retry-After and a message naming the quota and the usage.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import TooManyRequests
from app.models import Artifact, Dataset, Job, Model, Tenant

ACTIVE = ("queued", "running")


def limits(session: Session, settings: Settings, tenant_id: str, *, lock: bool = False) -> tuple[int, int]:
    """(active jobs, stored bytes) the tenant may have; 0 means no limit."""
    # Locking the tenant row makes concurrent submissions of one tenant take turns on PostgreSQL, so that
    # two of them cannot both see room for one more job. (SQLite has one writer at a time anyway.)
    tenant = session.get(Tenant, tenant_id, with_for_update=lock)
    jobs = (
        tenant.max_active_jobs
        if tenant and tenant.max_active_jobs is not None
        else settings.quota_active_jobs
    )
    stored = (
        tenant.max_storage_bytes
        if tenant and tenant.max_storage_bytes is not None
        else settings.quota_storage_bytes
    )
    return jobs, stored


def storage_used(session: Session, tenant_id: str) -> int:
    """Bytes the tenant keeps: uploads and artifacts whose files retention has not deleted."""
    total = 0
    for cls in (Model, Dataset):
        total += (
            session.scalar(
                select(func.coalesce(func.sum(cls.size_bytes), 0)).where(
                    cls.tenant_id == tenant_id, cls.expired_at.is_(None)
                )
            )
            or 0
        )
    total += (
        session.scalar(
            select(func.coalesce(func.sum(Artifact.size_bytes), 0))
            .join(Job, Job.id == Artifact.job_id)
            .where(Job.tenant_id == tenant_id, Artifact.expired_at.is_(None))
        )
        or 0
    )
    return int(total)


def active_jobs(session: Session, tenant_id: str) -> int:
    query = select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    return int(session.scalar(query) or 0)


def check_active_jobs(session: Session, settings: Settings, tenant_id: str) -> None:
    limit, _ = limits(session, settings, tenant_id, lock=True)
    if limit == 0:
        return
    active = active_jobs(session, tenant_id)
    if active >= limit:
        raise TooManyRequests(
            f"this tenant has {active} jobs queued or running, its limit (QAAS_QUOTA_ACTIVE_JOBS or the "
            f"tenant's own) is {limit}: wait for one to finish, or cancel one, then submit again",
            code="job_quota_exceeded",
            headers={"Retry-After": "30"},
        )


def check_storage(session: Session, settings: Settings, tenant_id: str, incoming: int = 0) -> None:
    """Refuse when the tenant's stored bytes, plus `incoming`, would pass its storage quota."""
    _, limit = limits(session, settings, tenant_id)
    if limit == 0:
        return
    used = storage_used(session, tenant_id)
    if used + incoming > limit:
        adding = f" and this upload of {incoming} bytes" if incoming else ""
        raise TooManyRequests(
            f"this tenant stores {used} bytes{adding}; its storage quota (QAAS_QUOTA_STORAGE_BYTES or the "
            f"tenant's own) is {limit} bytes: delete models, datasets or jobs you no longer need "
            "(DELETE /v1/models/{id} also deletes its jobs' artifacts)",
            code="storage_quota_exceeded",
            headers={"Retry-After": "3600"},
        )
