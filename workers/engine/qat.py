"""Quantization-aware training: fake-quantize, fine-tune on labelled data, convert to int8.

Only `.pt2` programs (TorchScript graph mode has no QAT). This module holds the mode's part (the fake
quantization, the observers' first look at calibration data, the training loop, as a `QATRecipe`); the job's
backend (workers.engine.lowering) prepares and converts. fbgemm: the program is rebuilt into modules (see
rebuild.py), prepared with `prepare_qat_fx` (conv+bn fused into QAT modules that keep learning their
batch-norm statistics until frozen), trained, converted with `convert_fx` and compiled to TorchScript. x86:
torchao's `prepare_qat_pt2e` on the program, trained by the same loop (same batches, optimizer, freezing
schedule), converted and compiled by AOTInductor.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    QConfig,
)
from torch.ao.quantization.fake_quantize import (
    default_fused_per_channel_wt_fake_quant,
    default_fused_wt_fake_quant,
)

from qaas.contract.jobs import QATConfig
from qaas.contract.shapes import LABELS
from workers.engine import backends, lowering
from workers.engine.checks.verify import Batch, call_model, flat_outputs
from workers.engine.errors import EngineError
from workers.engine.job import Int8Model, Job
from workers.engine.lowering import Modes, QATRecipe
from workers.engine.pipeline import check_request, start_job
from workers.engine.quiet import quiet
from workers.engine.result import ProgressFn, QuantResult
from workers.engine.static import REDUCE_RANGE, warn_few_samples

__all__ = ["qat_qconfig", "quantize_qat_model"]

MAX_TRAIN_SAMPLES = 1_000_000
HISTOGRAM_NOTE = (
    "activation_observer histogram is not used for QAT (it would search the range again at every step): "
    "activations use moving-average min/max fake quantization, torch.ao's QAT default"
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


def _train(job: Job, config: QATConfig, model: Any, modes: Modes) -> None:
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


def _initialise_observers(job: Job, config: QATConfig, model: Any, modes: Modes) -> None:
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

    def initialise(prepared: Any, modes: Modes) -> None:
        _initialise_observers(job, config, prepared, modes)

    recipe = QATRecipe(
        qconfig=lambda engine: qat_qconfig(config, job.notes, engine),
        initialise=initialise if "calibration" in job.files else None,
        train=lambda prepared, modes: _train(job, config, prepared, modes),
    )

    def convert(backend: str) -> Int8Model:
        with quiet():
            return lowering.get(backend).qat(job, config, recipe)

    return backends.run(job, convert)
