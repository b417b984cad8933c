"""Per-tenant quotas: jobs queued or running at once, bytes stored (uploads and artifacts), and uploads still
being inspected.

A tenant row's own limits win over the settings' defaults (the inspection quota has only the setting); 0 means
no limit. Over a quota the API answers 429 with Retry-After and a message naming the quota and the usage.

A check and the insert it allows are one critical section: `lock_tenant` first, in the transaction that
inserts, so that parallel requests of one tenant take turns (40 parallel submissions against a quota of 20 once
got 25 jobs on SQLite).
"""

from __future__ import annotations

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.errors import TooManyRequests
from app.models import Artifact, Dataset, Job, Model, Tenant
from qaas.contract.vocab import ACTIVE, UploadStatus


def lock_tenant(session: Session, tenant_id: str) -> Tenant | None:
    """Hold the tenant's quota lock until the session's transaction ends; returns the tenant row.

    PostgreSQL: the tenant row FOR NO KEY UPDATE (it does not wait for, nor block, the foreign-key checks of
    rows inserted meanwhile, which FOR UPDATE would turn into deadlocks). SQLite ignores FOR UPDATE, and pysqlite
    runs the reads before a transaction's first write outside of it: a write as the transaction's first
    statement takes the database's write lock (waiting up to the busy timeout, app.core.db) and holds it to the
    commit, as BEGIN IMMEDIATE would. So the counts read afterwards cannot change before the insert commits.
    """
    if session.get_bind().dialect.name == "sqlite":
        # A write that changes nothing; not of the key, which foreign keys would check.
        session.execute(
            update(Tenant).where(Tenant.id == tenant_id).values(max_active_jobs=Tenant.max_active_jobs)
        )
    return session.get(Tenant, tenant_id, with_for_update={"key_share": True}, populate_existing=True)


def limits(session: Session, settings: Settings, tenant_id: str, *, lock: bool = False) -> tuple[int, int]:
    """(active jobs, stored bytes) the tenant may have; 0 means no limit. `lock`: take the tenant's quota lock."""
    tenant = lock_tenant(session, tenant_id) if lock else session.get(Tenant, tenant_id)
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


def inspecting_uploads(session: Session, tenant_id: str) -> int:
    """The tenant's models and datasets still waiting for, or in, their inspection."""
    total = 0
    for cls in (Model, Dataset):
        query = (
            select(func.count())
            .select_from(cls)
            .where(cls.tenant_id == tenant_id, cls.status == UploadStatus.INSPECTING)
        )
        total += int(session.scalar(query) or 0)
    return total


def check_active_jobs(session: Session, settings: Settings, tenant_id: str) -> None:
    """Refuse one more job over the quota; takes the tenant's quota lock (the caller inserts the job next)."""
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


def check_storage(
    session: Session, settings: Settings, tenant_id: str, incoming: int = 0, *, counted: bool = False
) -> None:
    """Refuse when the tenant's stored bytes, plus `incoming`, would pass its storage quota.

    `counted`: the incoming bytes are in a row this transaction inserted already (see check_new_upload)."""
    _, limit = limits(session, settings, tenant_id)
    if limit == 0:
        return
    used = storage_used(session, tenant_id) - (incoming if counted else 0)
    if used + incoming > limit:
        adding = f" and this upload of {incoming} bytes" if incoming else ""
        raise TooManyRequests(
            f"this tenant stores {used} bytes{adding}; its storage quota (QAAS_QUOTA_STORAGE_BYTES or the "
            f"tenant's own) is {limit} bytes: delete models, datasets or jobs you no longer need "
            "(DELETE /v1/models/{id} also deletes its jobs' artifacts)",
            code="storage_quota_exceeded",
            headers={"Retry-After": "3600"},
        )


def check_inspecting(session: Session, settings: Settings, tenant_id: str, *, counted: bool = False) -> None:
    """Refuse one more upload while the tenant has QAAS_QUOTA_INSPECTING uploads waiting for inspection: an
    upload that keeps its inspection busy until the time limit holds a worker, and counts against no other quota.

    `counted`: the new upload's row is in this transaction already."""
    limit = settings.quota_inspecting
    if limit == 0:
        return
    waiting = inspecting_uploads(session, tenant_id) - (1 if counted else 0)
    if waiting >= limit:
        raise TooManyRequests(
            f"this tenant has {waiting} uploads still being inspected, its limit (QAAS_QUOTA_INSPECTING) is "
            f"{limit}: wait until GET /v1/models/{{id}} or /v1/datasets/{{id}} shows them ready or invalid, "
            "then upload again",
            code="inspection_quota_exceeded",
            headers={"Retry-After": "30"},
        )


def check_new_upload(session: Session, settings: Settings, tenant_id: str, size_bytes: int) -> None:
    """After an upload's row is flushed, before the commit: with the tenant's quota lock held, the storage and
    inspection quotas still hold, counting this upload. (The checks before its body was read took no lock, and
    the lock is taken only now so that it is not held while the file is stored.)"""
    lock_tenant(session, tenant_id)
    check_storage(session, settings, tenant_id, size_bytes, counted=True)
    check_inspecting(session, settings, tenant_id, counted=True)
