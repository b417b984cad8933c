from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import ObjectError
from qaas.contract.vocab import UploadStatus


class TensorSpec(BaseModel):
    shape: list[int]
    dtype: str = Field(description='e.g. "float32", "int64"; "str" for JSONL text, tokenized at job time.')


class DatasetOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "ds_01jf3k9v2q8x7w6t5r4p3n2m1",
                "name": "calib.npz",
                "format": "npz",
                "size_bytes": 262400,
                "sha256": "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
                "status": "ready",
                "num_samples": 256,
                "tensors": {"x": {"shape": [256, 256], "dtype": "float32"}},
                "has_labels": False,
                "error": None,
                "created_at": "2026-11-26T22:00:00Z",
            }
        }
    )
    id: str
    name: str
    format: str | None = None
    size_bytes: int
    sha256: str
    status: UploadStatus
    num_samples: int | None = None
    tensors: dict[str, TensorSpec] | None = None
    has_labels: bool | None = Field(None, description="True when the file holds a `labels` array.")
    classes: list[str] | None = Field(None, description="Image folders: class names in label order.")
    preprocess: dict[str, Any] | None = None
    error: ObjectError | None = None
    created_at: datetime
