from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.models.common import UTCDateTime, utcnow


class UploadedFile:
    """Columns shared by models and datasets: a stored upload that a runner inspects, owned by a tenant."""

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="RESTRICT"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    format: Mapped[str | None] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(200), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # Set when retention deleted the file (status `expired`): the row stays, pointing at nothing.
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When a worker claimed its inspection (app/services/stored.py, claim_next_inspection).
    inspection_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
