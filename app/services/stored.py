"""What models and datasets share: a stored upload that a runner inspects (inspecting -> ready | invalid)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core import queue
from app.core.config import Settings
from app.core.db import after_commit
from app.core.errors import not_found
from app.core.ids import new_id
from app.core.storage import Storage
from app.models import Dataset, Model
from app.models.common import utcnow
from app.services import quotas
from app.services.pagination import paginate
from app.services.uploads import ReceivedUpload
from qaas.contract.vocab import UploadStatus

T = TypeVar("T", Model, Dataset)


def save_upload(
    session: Session,
    settings: Settings,
    storage: Storage,
    upload: ReceivedUpload,
    create: Callable[[Session, Storage, ReceivedUpload, str], T],
    *,
    tenant_id: str,
) -> T:
    """The upload use case, once its body is received and checked: the storage quota, the file stored and its
    row added (`create`), the quotas again under the tenant's lock, counting this upload, then the commit.

    A refusal, or a failing commit, deletes the stored file: nothing of the upload is kept."""
    assert upload.file is not None
    quotas.check_storage(session, settings, tenant_id, upload.file.size_bytes)
    row = create(session, storage, upload, tenant_id)
    key = row.storage_key
    try:
        # Parallel uploads all passed the checks above: the locked one decides, counting this row.
        quotas.check_new_upload(session, settings, tenant_id, upload.file.size_bytes)
        session.commit()
    except Exception:
        session.rollback()
        storage.delete(key)
        raise
    return row


def record_upload(
    session: Session,
    storage: Storage,
    upload: ReceivedUpload,
    cls: type[T],
    *,
    tenant_id: str,
    prefix: str,
    task: str,
    **columns: Any,
) -> T:
    """Move the received file under a generated name, add its row, and queue its inspection after commit."""
    assert upload.file is not None
    object_id = new_id(prefix)
    key = f"uploads/{object_id}.bin"
    storage.commit(upload.file.tmp_path, key, sha256=upload.file.sha256)
    row = cls(
        id=object_id,
        tenant_id=tenant_id,
        name=(upload.fields.get("name") or upload.file.filename)[:200],
        size_bytes=upload.file.size_bytes,
        sha256=upload.file.sha256,
        storage_key=key,
        status=UploadStatus.INSPECTING,
        **columns,
    )
    session.add(row)
    session.flush()
    after_commit(session, lambda: queue.enqueue(task, object_id))
    return row


def get_stored(session: Session, cls: type[T], object_id: str, *, tenant_id: str) -> T:
    """The caller's object; another tenant's answers exactly like a missing one."""
    row = session.get(cls, object_id)
    if row is None or row.tenant_id != tenant_id:
        raise not_found(cls.__tablename__, object_id)
    return row


def list_stored(
    session: Session, cls: type[T], *, tenant_id: str, limit: int, cursor: str | None, status: str | None
) -> tuple[list[T], str | None]:
    query = select(cls).where(cls.tenant_id == tenant_id)
    if status:
        query = query.where(cls.status == status)
    return paginate(session, query, cls.id, limit, cursor)


def record_inspection(
    session: Session,
    cls: type[T],
    object_id: str,
    *,
    result: dict[str, Any] | None,
    error: tuple[str, str] | None,
    apply: Callable[[T, dict[str, Any]], None],
) -> None:
    """Worker side: store what the runner found. Only a row still `inspecting` changes."""
    row = session.get(cls, object_id, with_for_update=True)
    if row is None or row.status != UploadStatus.INSPECTING:
        return
    if error is not None:
        row.status = UploadStatus.INVALID
        row.error_code, row.error_message = error
        return
    assert result is not None
    row.status = UploadStatus.READY
    row.format = result.get("format")
    apply(row, result)


# Uploads looked at per table when picking the next inspection: the oldest waiting of every tenant are among
# them unless one tenant has this many waiting (its inspection quota keeps it far below).
CANDIDATES = 500
# A claim older than the inspection time limit plus this is a worker that died: the upload may be taken again.
CLAIM_MARGIN_S = 60.0


def claim_next_inspection(
    session: Session, *, timeout_s: float, now: datetime | None = None
) -> tuple[type[Model] | type[Dataset], str] | None:
    """Claim the next upload to inspect, fairly across tenants, and return (its class, its id); None when
    every waiting upload is claimed.

    An inspection message is a turn, not an order: whichever upload it was sent for, the worker inspects the
    waiting upload of the tenant with the fewest inspections running now, the oldest first. A tenant that
    uploads many models whose loading hangs until the time limit thus keeps at most its share of the workers,
    and another tenant's upload goes next. The claim is a conditional UPDATE (two workers never take the same
    upload); a claim older than `timeout_s` plus a margin belongs to a dead worker and is taken again.
    """
    now = now or utcnow()
    stale = now - timedelta(seconds=timeout_s + CLAIM_MARGIN_S)
    running: Counter[str] = Counter()
    waiting: list[tuple[datetime, str, type[Model] | type[Dataset], str]] = []
    for cls in (Model, Dataset):
        inspecting = cls.status == UploadStatus.INSPECTING
        claimed = cls.inspection_started_at >= stale
        running.update(session.scalars(select(cls.tenant_id).where(inspecting, claimed)))
        free = or_(cls.inspection_started_at.is_(None), cls.inspection_started_at < stale)
        rows = session.execute(
            select(cls.created_at, cls.tenant_id, cls.id)
            .where(inspecting, free)
            .order_by(cls.created_at, cls.id)
            .limit(CANDIDATES)
        )
        waiting += [(created, tenant, cls, object_id) for created, tenant, object_id in rows]
    for _, _, cls, object_id in sorted(waiting, key=lambda w: (running[w[1]], w[0], w[3])):
        taken = session.execute(
            update(cls)
            .where(
                cls.id == object_id,
                cls.status == UploadStatus.INSPECTING,
                or_(cls.inspection_started_at.is_(None), cls.inspection_started_at < stale),
            )
            .values(inspection_started_at=now)
        )
        if taken.rowcount == 1:  # type: ignore[attr-defined]
            return cls, object_id
    return None
