"""Quantization-aware training: fake-quantize, fine-tune on labelled data, convert to int8.

Only `.pt2` programs (TorchScript graph mode has no QAT). fbgemm: the program is rebuilt into modules (see
rebuild.py), prepared with `prepare_qat_fx` (conv+bn fused into QAT modules that keep learning their
batch-norm statistics until frozen), trained, converted with `convert_fx` and compiled to TorchScript. x86:
torchao's `prepare_qat_pt2e` on the program, trained by the same loop (same batches, optimizer, freezing
schedule), converted and compiled by AOTInductor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QConfig,
    get_default_qat_qconfig_mapping,
)
from torch.ao.quantization.fake_quantize import (
    default_fused_per_channel_wt_fake_quant,
    default_fused_wt_fake_quant,
)

from qaas.contract.jobs import QATConfig
from qaas.contract.shapes import LABELS
from workers.engine import backends
from workers.engine.errors import EngineError
from workers.engine.layers import ModuleProbe, unavailable
from workers.engine.pipeline import Int8Model, Job, check_request, count_layers, quiet, start_job
from workers.engine.rebuild import rebuild_modules
from workers.engine.result import ProgressFn, QuantResult
from workers.engine.static import (
    REDUCE_RANGE,
    excluded_layers,
    nothing_quantized,
    qconfig_mapping,
    script_float,
    to_torchscript,
    warn_few_samples,
    weighted_layers,
)
from workers.engine.verify import Batch, call_model, flat_outputs
from workers.engine.x86 import quantize_pt2e
from workers.engine.x86_pt2 import aoti_model, example_inputs, freeze_pt2e, pt2e_eval, pt2e_train

__all__ = ["qat_qconfig", "quantize_qat_model"]

MAX_TRAIN_SAMPLES = 1_000_000
HISTOGRAM_NOTE = (
    "activation_observer histogram is not used for QAT (it would search the range again at every step): "
    "activations use moving-average min/max fake quantization, torch.ao's QAT default"
)
X86_QAT_LAYERS = (
    "backend x86 trains a fake-quantized program whose layers do not pair one to one with the int8 "
    "program's (its batch norms are folded only when converting); backend fbgemm gives per-layer numbers "
    "for QAT"
)
X86_OBSERVER_NOTE = (
    "activation_observer {observer} is not used by backend x86's QAT: activations use torchao's "
    "moving-average min/max fake quantization"
)


@dataclass(frozen=True)
class Modes:
    """How to switch a prepared QAT model between training and evaluation, and freeze it part of the way."""

    train: Callable[[Any], Any]
    eval: Callable[[Any], Any]
    freeze: Callable[[Any], Any]
    disable_fake_quant: Callable[[Any], Any]
    enable_fake_quant: Callable[[Any], Any]


def _freeze_fx(model: Any) -> None:
    model.apply(torch.ao.quantization.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


FX_MODES = Modes(
    train=lambda m: m.train(),
    eval=lambda m: m.eval(),
    freeze=_freeze_fx,
    disable_fake_quant=lambda m: m.apply(torch.ao.quantization.disable_fake_quant),
    enable_fake_quant=lambda m: m.apply(torch.ao.quantization.enable_fake_quant),
)


def _pt2e_modes() -> Modes:
    from torchao.quantization.pt2e import disable_fake_quant, enable_fake_quant

    return Modes(
        train=pt2e_train,
        eval=pt2e_eval,
        freeze=freeze_pt2e,
        disable_fake_quant=lambda m: m.apply(disable_fake_quant),
        enable_fake_quant=lambda m: m.apply(enable_fake_quant),
    )


LABELS_HELP = (
    "a training dataset with a 'labels' array (class indices for loss cross_entropy, targets shaped like "
    "the model's output for mse)"
)


def qat_qconfig(config: QATConfig, notes: list[str], backend: str = "fbgemm") -> QConfig:
    """Fake quantization for QAT: the config's weight granularity and activation observer where torch allows."""
    weight = (
        default_fused_per_channel_wt_fake_quant
        if config.weight_granularity == "per_channel"
        else default_fused_wt_fake_quant
    )
    reduce_range = REDUCE_RANGE[backend]
    if config.activation_observer == "minmax":
        activation = FakeQuantize.with_args(
            observer=MinMaxObserver, quant_min=0, quant_max=255, reduce_range=reduce_range
        )
    else:
        if config.activation_observer == "histogram":
            notes.append(HISTOGRAM_NOTE)
        activation = FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=reduce_range
        )
    return QConfig(activation=activation, weight=weight)


def _loss(kind: str, output: Any, labels: torch.Tensor) -> torch.Tensor:
    outputs = flat_outputs(output)
    scores = outputs[0] if outputs else None
    if scores is None:
        raise EngineError("dataset_mismatch", "the model returns no floating-point tensor to train on")
    shape, got = list(scores.shape), f"{str(labels.dtype).removeprefix('torch.')} {list(labels.shape)}"
    if kind == "cross_entropy":
        if (
            scores.dim() != 2
            or labels.dim() != 1
            or labels.is_floating_point()
            or labels.shape[0] != shape[0]
            or int(labels.min()) < 0
            or int(labels.max()) >= shape[1]
        ):
            raise EngineError(
                "dataset_mismatch",
                f"loss cross_entropy needs class scores [N, classes] and labels of class indices (int64 [N], "
                f"0..{shape[-1] - 1}); the model returns {shape} and the labels are {got}",
            )
        return torch.nn.functional.cross_entropy(scores, labels.long())
    if labels.shape != scores.shape:
        raise EngineError(
            "dataset_mismatch", f"loss mse needs labels shaped like the model's output {shape}; got {got}"
        )
    return torch.nn.functional.mse_loss(scores, labels.to(scores.dtype))


def _train(job: Job, config: QATConfig, model: Any, modes: Modes = FX_MODES) -> None:
    """Fine-tune the fake-quantized model; freeze observers and batch-norm statistics part of the way."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=config.qat.learning_rate, momentum=0.9)
        if config.qat.optimizer == "sgd"
        else torch.optim.Adam(params, lr=config.qat.learning_rate)
    )
    options = {"batch_size": config.qat.batch_size, "limit": MAX_TRAIN_SAMPLES, "labels": True}
    batches = job.batches("train", seed=config.seed, **options)
    total = config.qat.epochs * len(batches)
    freeze_at = math.floor(config.qat.freeze_observers_after * total)
    step = 0
    modes.train(model)
    for epoch in range(config.qat.epochs):
        if epoch:  # a new order each epoch, the same on every run
            batches = job.batches("train", seed=config.seed + epoch, **options)
        for batch in batches:
            if step == freeze_at:
                modes.freeze(model)
            labels = batch.pop(LABELS)
            loss = _loss(config.qat.loss, model(*batch.values()), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            message = (
                f"epoch {epoch + 1}/{config.qat.epochs}, step {step}/{total}, loss {float(loss.detach()):.4g}"
            )
            job.report("training", 10.0 + 25.0 * step / total, message)
    modes.eval(model)


def _initialise_observers(job: Job, config: QATConfig, model: Any, modes: Modes = FX_MODES) -> None:
    """Observe calibration data with fake quantization off, so that training starts from sensible ranges."""
    limit = config.calibration_batches * config.batch_size
    batches: list[Batch] = job.batches(
        "calibration", batch_size=config.batch_size, limit=limit, seed=config.seed
    )
    job.calibration_samples = sum(len(next(iter(b.values()))) for b in batches)
    warn_few_samples(job)
    modes.eval(model)
    modes.disable_fake_quant(model)
    for i, batch in enumerate(batches):
        call_model(model, batch, by_name=False)
        job.report("calibrating", 5.0 + 5.0 * (i + 1) / len(batches), f"batch {i + 1}/{len(batches)}")
    modes.enable_fake_quant(model)


def _convert_fx(job: Job, config: QATConfig) -> Int8Model:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    rebuilt = rebuild_modules(job.loaded.program, static=True)
    job.notes.extend(rebuilt.warnings)
    excluded = excluded_layers(rebuilt, job)
    float_same_build = script_float(rebuilt.module)
    # Training updates the tensors in place: work on a copy, so that the float reference stays as uploaded.
    model = copy.deepcopy(rebuilt.module).train()
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())
    qconfig = qat_qconfig(config, job.notes, job.backend)
    mapping = qconfig_mapping(qconfig, get_default_qat_qconfig_mapping(job.backend), excluded)
    example = job.batches("train", batch_size=2, limit=2)[0]
    example.pop(LABELS, None)
    prepared = prepare_qat_fx(model, mapping, tuple(example.values()))
    if "calibration" in job.files:
        with torch.no_grad():
            _initialise_observers(job, config, prepared)
    _train(job, config, prepared)
    job.report("converting", 35.0, "converting the trained model to int8")
    reference = copy.deepcopy(prepared)  # the fake-quantized model the int8 one must match
    converted = convert_fx(prepared)
    module = to_torchscript(converted, job.loaded, config.seed, job.notes)
    quantized, float_layers = count_layers(module)
    if not quantized:
        raise nothing_quantized(job.loaded, bool(excluded))
    probe = ModuleProbe(
        _trained_float(reference),
        converted,
        weighted_layers(rebuilt, converted),
        torch.backends.quantized.engine,
    )
    return Int8Model(
        module,
        quantized,
        float_layers + len(rebuilt.float_weights),
        float_same_build,
        reference,
        layer_probe=probe,
    )


def _trained_float(prepared: Any) -> Any:
    """The trained model in float (a copy with fake quantization off): what per-layer SQNR compares the int8
    layers with, since training moved the weights away from the uploaded ones on purpose."""
    trained = copy.deepcopy(prepared).eval()
    trained.apply(torch.ao.quantization.disable_fake_quant)
    trained.apply(torch.ao.quantization.disable_observer)
    return trained


def _convert_x86(job: Job, config: QATConfig) -> Int8Model:
    """torchao's prepare_qat_pt2e on a copy of the program, trained by the same loop, for AOTInductor."""
    if config.activation_observer != "moving_average":
        job.notes.append(X86_OBSERVER_NOTE.format(observer=config.activation_observer))
    modes = _pt2e_modes()
    trained: dict[str, Any] = {}

    def calibrate(prepared: Any) -> None:
        _initialise_observers(job, config, prepared, modes)

    def train(prepared: Any) -> None:
        for param in prepared.parameters():
            param.requires_grad_(param.is_floating_point())
        _train(job, config, prepared, modes)
        reference = copy.deepcopy(prepared)  # the fake-quantized model the int8 one must match
        modes.eval(reference)
        trained["reference"] = reference

    # Training updates the tensors in place, and a program's modules share its tensors: work on a copy.
    quantized = quantize_pt2e(
        copy.deepcopy(job.loaded.program),
        mode="qat",
        example_inputs=example_inputs(job),
        calibrate=calibrate if "calibration" in job.files else None,
        train=train,
        per_channel=config.weight_granularity == "per_channel",
        exclude=config.exclude,
    )
    job.report("converting", 35.0, "converted the trained model to int8 by torchao pt2e")
    job.notes.append(unavailable(X86_QAT_LAYERS))
    return aoti_model(job, quantized, trained.get("reference"))


def quantize_qat_model(
    model_path: str | Path,
    config: QATConfig,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    calibration: Any = None,
    eval_data: Any = None,
    train: Any = None,
    progress: ProgressFn | None = None,
) -> QuantResult:
    """Fine-tune with fake quantization, convert, verify the reloaded artifact, benchmark; see api.quantize.

    Raises:
        EngineError: unsupported_combination for TorchScript and Hugging Face models (support.refusal),
            labels_required without labelled training data, dataset_mismatch for labels that do not fit the
            loss, nothing_quantized, the pipeline's codes.
    """
    fmt = check_request("qat", model_path, config)
    if train is None:
        raise EngineError("labels_required", f"QAT trains the model: give {LABELS_HELP}")
    data = {"eval": eval_data, "calibration": calibration, "train": train}
    job = start_job(
        "qat",
        model_path,
        config,
        out_dir=out_dir,
        input_shapes=input_shapes,
        data=data,
        progress=progress,
        fmt=fmt,
    )
    if not job.has_labels("train"):
        raise EngineError(
            "labels_required", f"the training dataset has no 'labels' array: give {LABELS_HELP}"
        )

    def convert(backend: str) -> Int8Model:
        with quiet():
            return _convert_x86(job, config) if backend == "x86" else _convert_fx(job, config)

    return backends.run(job, convert)
