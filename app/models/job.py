from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.core.db import Base
from app.models.common import JSONType, UTCDateTime, utcnow


class Job(Base):
    """A quantization job. The row is the truth; the broker only carries its id."""

    __tablename__ = "job"
    __table_args__ = (
        Index("ix_job_model_id_id", "model_id", "id"),
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_job_tenant_id_idempotency_key"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenant.id", ondelete="RESTRICT"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("model.id", ondelete="RESTRICT"))
    calibration_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id", ondelete="RESTRICT"))
    train_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id", ondelete="RESTRICT"))
    eval_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("dataset.id", ondelete="RESTRICT"))
    status: Mapped[str] = mapped_column(String(16), index=True)
    mode: Mapped[str] = mapped_column(String(16))
    backend_requested: Mapped[str] = mapped_column(String(16))
    backend_chosen: Mapped[str | None] = mapped_column(String(16))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    stage: Mapped[str | None] = mapped_column(String(32))
    percent: Mapped[float] = mapped_column(Float, default=0.0)
    message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    load_snippet: Mapped[str | None] = mapped_column(Text)
    runner: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    metrics: Mapped[JobMetrics | None] = relationship(lazy="selectin", cascade="all, delete-orphan")


class JobMetrics(Base):
    """Headline numbers as columns (to compare jobs in SQL) and the full metrics document as JSON."""

    __tablename__ = "job_metrics"

    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), primary_key=True)
    fp32_bytes: Mapped[int | None] = mapped_column(BigInteger)
    int8_bytes: Mapped[int | None] = mapped_column(BigInteger)
    size_ratio: Mapped[float | None] = mapped_column(Float)
    speedup: Mapped[float | None] = mapped_column(Float)
    sqnr_db: Mapped[float | None] = mapped_column(Float)
    cosine: Mapped[float | None] = mapped_column(Float)
    accuracy_delta: Mapped[float | None] = mapped_column(Float)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
