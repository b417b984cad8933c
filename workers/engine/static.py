"""Post-training static int8 quantization: observe activations on calibration data, then convert.

fbgemm on a `.pt2`: the program is rebuilt into modules (convolutions, batch norms, ReLUs and Linear: see
rebuild.py) so that FX graph mode fuses conv+bn+relu and linear+relu, observes, converts; the result is
compiled to TorchScript (`model.int8.ts`). x86 on a `.pt2`: torchao pt2e (X86InductorQuantizer) calibrated on
the same batches, compiled by AOTInductor (`model.int8.aoti.pt2`). TorchScript uploads go through TorchScript
graph mode (`quantize_jit`) on the fbgemm or x86 engine. This module holds the mode's part (the observers,
the calibration batches and pass, as a `StaticRecipe`); the job's backend (workers.engine.lowering) prepares
and converts; backends.run verifies and measures the result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.ao.quantization import (
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QConfig,
    default_per_channel_weight_observer,
    default_weight_observer,
)

from qaas.contract.jobs import StaticConfig
from workers.engine import backends, lowering
from workers.engine.checks.verify import Batch, call_model, fixed_batch
from workers.engine.errors import EngineError
from workers.engine.job import Int8Model, Job
from workers.engine.lowering import StaticRecipe
from workers.engine.pipeline import check_request, start_job
from workers.engine.quiet import quiet
from workers.engine.result import ProgressFn, QuantResult

__all__ = ["activation_observer", "calibration_batches", "quantize_static_model", "static_qconfig"]

MIN_CALIBRATION_SAMPLES = 32
OBSERVERS: dict[str, Any] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
}
# fbgemm's int8 kernels can overflow with the full 8-bit activation range on CPUs without VNNI; torch's
# fbgemm and x86 defaults keep 7 bits (docs/engine-notes.md, "Seven-bit activations": full range breaks
# depthwise convolutions on both).
REDUCE_RANGE = {"fbgemm": True, "x86": True}


def activation_observer(config: Any, backend: str = "fbgemm") -> Any:
    """The activation observer factory a config asks for (quint8, affine, reduce_range per engine)."""
    return OBSERVERS[config.activation_observer].with_args(reduce_range=REDUCE_RANGE[backend])


def static_qconfig(config: Any, backend: str = "fbgemm") -> QConfig:
    """The QConfig of a static job: its activation observer, per-channel or per-tensor symmetric int8 weights.

    Example:
        >>> static_qconfig(StaticConfig(weight_granularity="per_tensor", activation_observer="minmax"))
    """
    weight = (
        default_per_channel_weight_observer
        if config.weight_granularity == "per_channel"
        else default_weight_observer
    )
    return QConfig(activation=activation_observer(config, backend), weight=weight)


def _observe(job: Job, model: Any, batches: list[Batch], stage: str, span: tuple[float, float]) -> None:
    low, high = span
    with torch.no_grad():
        for i, batch in enumerate(batches):
            call_model(model, batch, by_name=job.by_name)
            job.report(stage, low + (high - low) * (i + 1) / len(batches), f"batch {i + 1}/{len(batches)}")


def calibration_batches(job: Job, config: Any) -> list[Batch]:
    """`calibration_batches` shuffled batches of `batch_size` from the calibration set; counts the samples."""
    limit = config.calibration_batches * config.batch_size
    fixed = fixed_batch(job.loaded.info.inputs)
    if fixed is not None and fixed != config.batch_size:
        job.notes.append(f"the model has a fixed batch size of {fixed}: calibrated in batches of {fixed}")
        limit = config.calibration_batches * fixed
    batches = job.batches("calibration", batch_size=config.batch_size, limit=limit, seed=config.seed)
    job.calibration_samples = sum(len(next(iter(b.values()))) for b in batches)
    warn_few_samples(job)
    return batches


def warn_few_samples(job: Job) -> None:
    """A warning when calibration observed fewer than MIN_CALIBRATION_SAMPLES samples (static and QAT)."""
    if 0 < job.calibration_samples < MIN_CALIBRATION_SAMPLES:
        job.notes.append(
            f"only {job.calibration_samples} calibration samples were observed: activation ranges from fewer "
            f"than {MIN_CALIBRATION_SAMPLES} are often off; give 100-500 samples like those the model sees"
        )


def quantize_static_model(
    model_path: str | Path,
    config: StaticConfig,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    calibration: Any = None,
    eval_data: Any = None,
    train: Any = None,
    progress: ProgressFn | None = None,
) -> QuantResult:
    """Quantize statically: calibrate, convert, verify the reloaded artifact, benchmark it; see api.quantize.

    Raises:
        EngineError: unsupported_combination (support.refusal), dataset_required without calibration data,
            nothing_quantized, and the pipeline's codes.
    """
    fmt = check_request("static", model_path, config)
    if calibration is None:
        raise EngineError(
            "dataset_required",
            "static quantization measures activation ranges on calibration data: give a calibration dataset "
            "(100-500 samples like those the model sees), or use mode dynamic, which needs none",
        )
    data = {"eval": eval_data, "calibration": calibration, "train": train}
    job = start_job(
        "static",
        model_path,
        config,
        out_dir=out_dir,
        input_shapes=input_shapes,
        data=data,
        progress=progress,
        fmt=fmt,
    )
    batches = calibration_batches(job, config)  # the same batches for every candidate backend
    job.report("calibrating", 10.0, f"observing {job.calibration_samples} calibration samples")
    recipe = StaticRecipe(
        qconfig=lambda engine: static_qconfig(config, engine),
        calibrate=lambda prepared: _observe(job, prepared, batches, "calibrating", (10.0, 35.0)),
        example=tuple(batches[0].values()),
    )

    def convert(backend: str) -> Int8Model:
        with quiet():
            return lowering.get(backend).static(job, config, recipe)

    return backends.run(job, convert)
