from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base
from app.models.common import UTCDateTime, utcnow

# Every object belongs to a tenant. With QAAS_AUTH=disabled every request acts as this one, which the
# migration creates and gives every row stored before tenancy existed.
DEFAULT_TENANT_ID = "ten_default"
DEFAULT_TENANT_NAME = "default"


class Tenant(Base):
    """A team sharing qaas: its objects are visible to its keys only. Quotas of null mean the settings' defaults."""

    __tablename__ = "tenant"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKey(Base):
    """An API key: the id is public (it starts the key), only the secret's sha256 is stored.

    The secret is 256 random bits, so a plain hash is as strong as a slow one would be: nothing to guess."""

    __tablename__ = "api_key"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
