from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import ObjectError
from qaas.contract.vocab import UploadStatus


class InputSpec(BaseModel):
    name: str
    shape: list[int | None] = Field(description="null marks a dynamic dimension (e.g. the batch).")
    dtype: str


class Inspection(BaseModel):
    inputs: list[InputSpec]
    parameters: int
    layers: dict[str, int] = Field(description='Layer counts by type, e.g. {"Linear": 3}.')
    hf: dict[str, Any] | None = Field(
        None,
        description="Hugging Face uploads: model_type, architecture, tokenizer (bool), vocab_size, max_length.",
    )


class ModelOut(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "mdl_01jf3k9v2q8x7w6t5r4p3n2m1",
                "name": "mlp.pt2",
                "format": "pt2",
                "size_bytes": 1052672,
                "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
                "status": "ready",
                "inspection": {
                    "inputs": [{"name": "x", "shape": [None, 256], "dtype": "float32"}],
                    "parameters": 263168,
                    "layers": {"Linear": 4, "ReLU": 3},
                },
                "error": None,
                "created_at": "2026-11-26T22:00:00Z",
            }
        }
    )
    id: str
    name: str
    format: str | None = Field(None, description="pt2 or torchscript, detected from the content.")
    size_bytes: int
    sha256: str
    status: UploadStatus
    input_shapes: dict[str, Any] | None = None
    inspection: Inspection | None = None
    error: ObjectError | None = None
    created_at: datetime
