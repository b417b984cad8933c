"""What models and datasets share: a stored upload that a runner inspects (inspecting -> ready | invalid)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import after_commit
from app.core.errors import not_found
from app.core.ids import new_id
from app.core.storage import Storage
from app.models import Dataset, Model
from app.services.pagination import paginate
from app.services.uploads import ReceivedUpload

T = TypeVar("T", Model, Dataset)


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
        status="inspecting",
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
    if row is None or row.status != "inspecting":
        return
    if error is not None:
        row.status = "invalid"
        row.error_code, row.error_message = error
        return
    assert result is not None
    row.status = "ready"
    row.format = result.get("format")
    apply(row, result)
