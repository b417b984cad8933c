"""The engine's one verb: `quantize(model, config, …) -> QuantResult`, dispatching on the config's type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qaas.contract.jobs import DynamicConfig, QATConfig, StaticConfig
from workers.engine.dynamic import quantize_dynamic_model
from workers.engine.qat import quantize_qat_model
from workers.engine.result import ArtifactFile, ProgressFn, QuantResult
from workers.engine.static import quantize_static_model

__all__ = ["ArtifactFile", "ProgressFn", "QuantResult", "quantize"]

Handler = Callable[..., QuantResult]
# One handler per config type (QATConfig extends StaticConfig: the exact type picks).
_HANDLERS: dict[type, Handler] = {
    DynamicConfig: quantize_dynamic_model,
    StaticConfig: quantize_static_model,
    QATConfig: quantize_qat_model,
}


def quantize(
    model_path: str | Path,
    config: Any,
    *,
    out_dir: str | Path,
    input_shapes: dict[str, list[int | None]] | None = None,
    calibration: str | Path | None = None,
    eval_data: str | Path | None = None,
    train: str | Path | None = None,
    progress: ProgressFn | None = None,
) -> QuantResult:
    """Quantize a model to int8, verify the artifact reloaded from disk, and measure it.

    What is served for each model format, mode and backend is `support.SUPPORT`; anything else is refused
    with unsupported_combination before any work. Backend "auto" quantizes with every candidate backend,
    verifies and times each on this CPU, keeps one (metrics["backends"], metrics["backend_choice"]) and
    returns it as result.backend.

    Args:
        model_path: a torch.export program (`.pt2`), a TorchScript archive or a zipped Hugging Face model; the
            format is read from content.
        config: what to do, e.g. DynamicConfig(); its type picks the handler, its backend the backend(s).
        out_dir: where the artifact goes: model.int8.ts (TorchScript, fbgemm or x86 engine) or
            model.int8.aoti.pt2 (AOTInductor package, x86 on a `.pt2`); nothing else is left there.
        input_shapes: TorchScript only: {name: [dims]} with None for dynamic dims, e.g. {"x": [None, 16]}.
        calibration: a dataset file (.npz, .safetensors, image-folder zip, or JSONL text for Hugging Face
            models); dynamic mode verifies on it when eval_data is None.
        eval_data: a dataset file to verify on.
        train: a labelled dataset file (QAT only).
        progress: called with (stage, percent, message).

    Returns:
        QuantResult: the chosen backend, the artifacts, metrics (docs/architecture.md), a load snippet, a manifest.

    Raises:
        EngineError: for inputs or requests the user can fix (see errors.EngineError for the codes).
        ValueError: for a config type no handler serves.

    Example:
        >>> result = quantize("model.pt2", DynamicConfig(), out_dir="out")
        >>> result.metrics["size"]["ratio"], result.metrics["fidelity"]["cosine"]
        (3.8, 0.9998)
    """
    handler = _HANDLERS.get(type(config))
    if handler is None:
        known = ", ".join(t.__name__ for t in _HANDLERS)
        raise ValueError(f"no quantization handler for {type(config).__name__}: use one of {known}")
    return handler(
        model_path,
        config,
        out_dir=out_dir,
        input_shapes=input_shapes,
        calibration=calibration,
        eval_data=eval_data,
        train=train,
        progress=progress,
    )
