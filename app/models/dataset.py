from __future__ import annotations

from typing import Any

from sqlalchemy import Boolean, Integer
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base
from app.models.common import JSONType
from app.models.upload import UploadedFile


class Dataset(UploadedFile, Base):
    """Calibration, training or evaluation data. `inspecting` until a runner has read it."""

    __tablename__ = "dataset"

    preprocess: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    num_samples: Mapped[int | None] = mapped_column(Integer)
    tensors: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    has_labels: Mapped[bool | None] = mapped_column(Boolean)
    classes: Mapped[list[str] | None] = mapped_column(JSONType)
