from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base
from app.models.common import UTCDateTime, utcnow


class Artifact(Base):
    """A file a job produced, stored under a generated key, with the sha256 served as ETag and Repr-Digest."""

    __tablename__ = "artifact"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifact_job_id_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("job.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    format: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    storage_key: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Set when retention deleted the file: the row stays (the job's record), its download answers 410.
    expired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
