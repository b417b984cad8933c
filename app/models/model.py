from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base
from app.models.common import JSONType
from app.models.upload import UploadedFile


class Model(UploadedFile, Base):
    """An uploaded model file. `inspecting` until a runner has loaded it, then `ready` or `invalid`."""

    __tablename__ = "model"

    input_shapes: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    inspection: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
