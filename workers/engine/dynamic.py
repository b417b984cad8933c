"""Dynamic int8 quantization: int8 weights, activations quantized on the fly.

Dynamic mode needs no data: the job's backend (workers.engine.lowering) quantizes what it can. fbgemm on a
`.pt2`: the program rebuilt into modules, `quantize_dynamic` (Linear, LSTM, GRU), TorchScript. x86 on a `.pt2`:
torchao pt2e (Linear layers) compiled by AOTInductor. TorchScript uploads go through graph mode
(`quantize_dynamic_jit`, Linear only) and Hugging Face encoders through hf.quantize_hf_dynamic, on the fbgemm
or x86 engine. Every artifact is verified after a reload from disk and benchmarked against the float model
(backends.run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qaas.contract.jobs import DynamicConfig
from workers.engine import backends, lowering
from workers.engine.job import Int8Model, Job
from workers.engine.pipeline import check_request, start_job
from workers.engine.quiet import quiet
from workers.engine.result import ProgressFn, QuantResult

__all__ = ["quantize_dynamic_model"]


def _convert(job: Job, config: DynamicConfig, backend: str) -> Int8Model:
    lowered = lowering.get(backend)
    job.report("converting", 15.0, f"quantizing {lowered.dynamic_layers(job.format)} to int8")
    with quiet():
        return lowered.dynamic(job, config)


def quantize_dynamic_model(
    model_path: str | Path,
    config: DynamicConfig,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    calibration: Any = None,
    eval_data: Any = None,
    train: Any = None,
    progress: ProgressFn | None = None,
) -> QuantResult:
    """Quantize a model dynamically, verify the reloaded artifact, benchmark it; see api.quantize.

    Raises:
        EngineError: unsupported_combination (support.refusal), nothing_quantized, the pipeline's codes.
    """
    fmt = check_request("dynamic", model_path, config)
    data = {"eval": eval_data, "calibration": calibration, "train": train}
    job = start_job(
        "dynamic",
        model_path,
        config,
        out_dir=out_dir,
        input_shapes=input_shapes,
        data=data,
        progress=progress,
        fmt=fmt,
    )
    return backends.run(job, lambda backend: _convert(job, config, backend))
