"""Post-training static int8 quantization: observe activations on calibration data, then convert.

fbgemm on a `.pt2`: the program is rebuilt into modules (convolutions, batch norms, ReLUs and Linear: see
rebuild.py) so that FX graph mode fuses conv+bn+relu and linear+relu, observes, converts; the result is
compiled to TorchScript (`model.int8.ts`). x86 on a `.pt2`: torchao pt2e (X86InductorQuantizer) calibrated on
the same batches, compiled by AOTInductor (`model.int8.aoti.pt2`). TorchScript uploads go through TorchScript
graph mode (`quantize_jit`) on the fbgemm or x86 engine. backends.run verifies and measures the result.
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
    QConfigMapping,
    default_per_channel_weight_observer,
    default_weight_observer,
)

from qaas.contract.jobs import StaticConfig
from workers.engine import backends
from workers.engine.errors import EngineError
from workers.engine.io import LoadedModel
from workers.engine.layers import (
    GRAPH_MODE,
    ModuleProbe,
    ProgramProbe,
    fused_float,
    quantized_layers,
    unavailable,
)
from workers.engine.pipeline import Exclusions, Int8Model, Job, check_request, count_layers, quiet, start_job
from workers.engine.rebuild import RebuiltModel, rebuild_modules
from workers.engine.result import ProgressFn, QuantResult
from workers.engine.verify import Batch, call_model, fixed_batch, random_batch
from workers.engine.x86 import quantize_pt2e
from workers.engine.x86_pt2 import aoti_model, example_inputs
from workers.engine.x86_torchscript import qconfig_mapping as default_mapping

__all__ = [
    "activation_observer",
    "qconfig_mapping",
    "quantize_static_model",
    "static_qconfig",
    "to_torchscript",
]

MIN_CALIBRATION_SAMPLES = 32
OBSERVERS: dict[str, Any] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
}
# fbgemm's int8 kernels can overflow with the full 8-bit activation range on CPUs without VNNI; torch's
# fbgemm and x86 defaults keep 7 bits (ENGINE_NOTES: full range breaks depthwise convolutions on both).
REDUCE_RANGE = {"fbgemm": True, "x86": True}
STATIC_LAYERS = "Conv1d/2d/3d, Linear and BatchNorm (fused with a following ReLU)"
WEIGHTED = {"Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"}


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


def qconfig_mapping(qconfig: QConfig, base: QConfigMapping, excluded: list[str]) -> QConfigMapping:
    """torch's default mapping for the engine (`base`) with `qconfig` as the global one, excluded names float.

    The per-type entries that share the default's activation observer (transposed convolutions, layer norm)
    get the job's observer too; fixed-qparams ops (sigmoid, tanh, softmax) keep theirs.
    """
    default = base.global_qconfig
    base.set_global(qconfig)
    for key, entry in list(base.object_type_qconfigs.items()):
        if entry is not None and default is not None and entry.activation is default.activation:
            base.set_object_type(key, QConfig(activation=qconfig.activation, weight=entry.weight))
    for name in excluded:
        base.set_module_name(name, None)
    return base


def excluded_layers(rebuilt: RebuiltModel, job: Job) -> list[str]:
    """The rebuilt module names that config.exclude keeps in float (by path, module name or type name).

    Raises:
        EngineError: nothing_quantized when no layer static quantization converts is left, before any
            calibration or training time is spent.
    """
    excluded = Exclusions(job.config.exclude)
    names = [n for n, (path, kind) in rebuilt.layers.items() if excluded(path, n, type_name=kind)]
    job.notes.extend(excluded.unused_warnings())
    if not any(kind in WEIGHTED for n, (_, kind) in rebuilt.layers.items() if n not in names):
        raise nothing_quantized(job.loaded, any(kind in WEIGHTED for _, kind in rebuilt.layers.values()))
    return names


def nothing_quantized(loaded: LoadedModel, excluded: bool) -> EngineError:
    """The error for a model in which no layer became int8, listing the layer types it has."""
    found = ", ".join(f"{kind} ({count})" for kind, count in loaded.info.layers.items()) or "none"
    why = "every candidate layer is excluded" if excluded else f"static quantization converts {STATIC_LAYERS}"
    return EngineError("nothing_quantized", f"no layer was quantized ({why}); the model's layers: {found}")


def to_torchscript(module: Any, loaded: LoadedModel, seed: int, notes: list[str]) -> Any:
    """Script a converted module (every dimension stays dynamic), or trace it when scripting fails; freeze it.

    Freezing inlines the quantized modules into one forward with their packed weights as constants: the same
    outputs, a quarter to a third smaller on the test CNNs (the code of each torch.ao module class goes), no
    slower.
    """
    try:
        compiled = torch.jit.script(module)
    except Exception as exc:
        # Tracing is the fallback: pipeline.finish runs the artifact at batch 1 and 3 to catch a fixed batch.
        notes.append(
            f"the int8 model was traced, not scripted ({type(exc).__name__}); check other input shapes"
        )
        specs = loaded.info.inputs
        example = random_batch(specs, fixed_batch(specs) or 2, seed=seed)
        compiled = torch.jit.trace(module, tuple(example.values()), check_trace=False)
    try:
        return torch.jit.freeze(compiled.eval())
    except Exception:
        return compiled  # an unfrozen module is as correct, only bigger


def script_float(module: Any) -> Any:
    """The float model compiled like the int8 one, for the same-build speedup; None when it cannot be."""
    try:
        return torch.jit.script(module)
    except Exception:
        return None  # only a comparison is lost: the benchmark then reports fp32 as uploaded


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


def _convert_program(job: Job, config: StaticConfig, batches: list[Batch]) -> Int8Model:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    rebuilt = rebuild_modules(job.loaded.program, static=True)
    job.notes.extend(rebuilt.warnings)
    excluded = excluded_layers(rebuilt, job)
    float_same_build = script_float(rebuilt.module)
    fused = fused_float(rebuilt.module)  # the float side of per-layer SQNR, one module per int8 module
    qconfig = static_qconfig(config, job.backend)
    mapping = qconfig_mapping(qconfig, default_mapping(job.backend), excluded)
    prepared = prepare_fx(rebuilt.module, mapping, tuple(batches[0].values()))
    _observe(job, prepared, batches, "calibrating", (10.0, 35.0))
    job.report("converting", 35.0, "converting to int8")
    converted = convert_fx(prepared)
    module = to_torchscript(converted, job.loaded, config.seed, job.notes)
    quantized, float_layers = count_layers(module)
    if not quantized:
        raise nothing_quantized(job.loaded, bool(excluded))
    probe = ModuleProbe(
        fused, converted, weighted_layers(rebuilt, converted), torch.backends.quantized.engine
    )
    return Int8Model(module, quantized, float_layers, float_same_build, layer_probe=probe)


def weighted_layers(rebuilt: RebuiltModel, converted: Any) -> dict[str, tuple[str, str]]:
    """The rebuilt weighted layers (conv, linear, batch norm) that are int8 modules in `converted`: a fused
    group under its first layer's name (conv+bn+relu is the conv)."""
    candidates = {n: layer for n, layer in rebuilt.layers.items() if layer[1] in WEIGHTED}
    return quantized_layers(converted, candidates)


def _convert_script(job: Job, config: StaticConfig, batches: list[Batch]) -> Int8Model:
    model = job.loaded.module
    leaves = {n: m for n, m in model.named_modules() if n and not any(True for _ in m.children())}
    excluded = Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {"": static_qconfig(config, job.backend)}
    for name, sub in leaves.items():
        if excluded(name, type_name=sub.original_name):
            qconfigs[name] = None
    job.notes.extend(excluded.unused_warnings())

    def calibrate(prepared: Any, data: list[Batch]) -> None:
        _observe(job, prepared, data, "calibrating", (10.0, 35.0))

    module = torch.ao.quantization.quantize_jit(model, qconfigs, calibrate, [batches])
    job.report("converting", 35.0, "converted to int8 by TorchScript graph mode")
    quantized, float_layers = count_layers(module)
    if not quantized:
        candidates = [n for n, m in leaves.items() if m.original_name in WEIGHTED]
        raise nothing_quantized(job.loaded, bool(candidates) and all(n in qconfigs for n in candidates))
    job.notes.append(unavailable(GRAPH_MODE))
    # The uploaded TorchScript is already the same build as the int8 model: it is its own comparison.
    return Int8Model(module, quantized, float_layers, model)


def _convert_x86_program(job: Job, config: StaticConfig, batches: list[Batch]) -> Int8Model:
    """torchao pt2e (X86InductorQuantizer) calibrated on the same batches, for AOTInductor."""

    def calibrate(prepared: Any) -> None:
        _observe(job, prepared, batches, "calibrating", (10.0, 35.0))

    quantized = quantize_pt2e(
        job.loaded.program,
        mode="static",
        example_inputs=example_inputs(job),
        calibrate=calibrate,
        per_channel=config.weight_granularity == "per_channel",
        observer=config.activation_observer,
        exclude=config.exclude,
    )
    job.report("converting", 35.0, "converted to int8 by torchao pt2e")
    made = aoti_model(job, quantized)
    made.layer_probe = ProgramProbe(job.loaded.module, quantized.program.module())
    return made


def _convert(job: Job, config: StaticConfig, batches: list[Batch]) -> Int8Model:
    with quiet():
        if job.format != "pt2":
            return _convert_script(job, config, batches)
        if job.backend == "x86":
            return _convert_x86_program(job, config, batches)
        return _convert_program(job, config, batches)


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
    return backends.run(job, lambda backend: _convert(job, config, batches))
