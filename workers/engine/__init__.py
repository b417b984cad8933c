"""qaas quantization engine: a pure library (torch, numpy, safetensors, stdlib).

    from workers.engine import DynamicConfig, quantize
    result = quantize("model.pt2", DynamicConfig(), out_dir="out")

Names are imported lazily, so that `workers.engine.errors` loads without torch. The support matrix and the
dataset shape rule live in `qaas.support` and `qaas.shapes`: pure modules the API shares with the engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "quantize": "workers.engine.api",
    "QuantResult": "workers.engine.result",
    "ArtifactFile": "workers.engine.result",
    "ProgressFn": "workers.engine.result",
    "BenchmarkConfig": "workers.engine.config",
    "DynamicConfig": "workers.engine.config",
    "StaticConfig": "workers.engine.config",
    "QATConfig": "workers.engine.config",
    "EngineError": "workers.engine.errors",
    "detect_model_format": "workers.engine.archive",
    "inspect_model": "workers.engine.io",
    "load_model": "workers.engine.io",
    "ModelInfo": "workers.engine.io",
    "InputSpec": "workers.engine.io",
    "inspect_dataset": "workers.engine.data",
    "load_dataset": "workers.engine.data",
    "check_dataset_matches": "workers.engine.data",
    "DatasetInfo": "workers.engine.data",
    "check_shapes_match": "qaas.shapes",
    "SUPPORT": "qaas.support",
    "refusal": "qaas.support",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'workers.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
