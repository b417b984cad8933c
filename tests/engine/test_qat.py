"""Quantization-aware training: fine-tunes on labels, reports progress, keeps accuracy, refuses what it can't do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qaas.contract.jobs import QATConfig, QATOptions
from tests.engine.conftest import FAST_BENCHMARK, WIDTH
from tests.engine.conftest_static import IMAGE, Digits
from workers.engine.api import quantize
from workers.engine.errors import EngineError

pytest_plugins = ["tests.engine.conftest_static"]


def config(**options: Any) -> QATConfig:
    """A QAT config on fbgemm: the QAT knobs (epochs, loss, ...) go to `qat`, the others to the config."""
    training = {k: options.pop(k) for k in list(options) if k in QATOptions.model_fields}
    return QATConfig(backend="fbgemm", benchmark=FAST_BENCHMARK, qat=QATOptions(**training), **options)


def test_digits_qat_keeps_accuracy_and_reports_training(digits: Digits, tmp_path: Path) -> None:
    progress: list[tuple[str, float, str]] = []
    result = quantize(
        digits.pt2,
        config(epochs=1, learning_rate=1e-3, activation_observer="moving_average"),
        out_dir=tmp_path,
        train=digits.train,
        eval_data=digits.test,
        progress=lambda stage, percent, message: progress.append((stage, percent, message)),
    )
    accuracy = result.metrics["accuracy"]
    assert accuracy["fp32"] == pytest.approx(digits.accuracy, abs=1e-3)  # the uploaded model, not trained
    assert abs(accuracy["delta"]) <= 1.0
    layers = result.metrics["layers"]
    assert (layers["quantized"], layers["float"]) == (3, 0)
    # Against the trained model in float: each fused group under its first layer's name, worst first.
    rows = layers["per_layer"]
    assert {row["name"]: row["type"] for row in rows} == {
        "features.0": "Conv2d", "features.3": "Conv2d", "head": "Linear",
    }  # fmt: skip
    values = [row["sqnr_db"] for row in rows]
    assert values == sorted(values) and all(15 < v < 200 for v in values)
    training = [(percent, message) for stage, percent, message in progress if stage == "training"]
    steps = -(-1347 // 32)  # 1347 training samples in batches of 32
    assert len(training) == steps
    assert all(a[0] < b[0] for a, b in zip(training, training[1:], strict=False))
    assert training[-1][1].startswith(f"epoch 1/1, step {steps}/{steps}, loss ")
    stages = [stage for stage, _, _ in progress]
    assert stages.index("training") < stages.index("converting") < stages.index("verifying")
    assert result.manifest["mode"] == "qat"
    assert set(result.manifest["files_sha256"]) == {"model", "train", "eval"}
    torch.backends.quantized.engine = "fbgemm"
    int8 = torch.jit.load(str(result.artifacts[0].path))
    assert "quantized::conv2d" in str(int8.inlined_graph)
    assert int8(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_accuracy_on_the_training_set_without_eval_data(digits: Digits, tmp_path: Path) -> None:
    options = {"optimizer": "adam", "learning_rate": 1e-4, "weight_granularity": "per_tensor"}
    result = quantize(
        digits.pt2, config(**options), out_dir=tmp_path, train=digits.train, calibration=digits.train
    )
    assert result.metrics["accuracy"]["int8"] >= 90
    assert result.manifest["calibration_samples"] == 256  # 32 batches of 8 initialise the observers
    assert any("histogram is not used for QAT" in w for w in result.metrics["warnings"])


def test_mse_loss_on_an_mlp(mlp_pt2: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    data = tmp_path / "train.npz"
    np.savez(
        data,
        x=rng.standard_normal((64, WIDTH)).astype(np.float32),
        labels=rng.standard_normal((64, 10)).astype(np.float32),
    )
    result = quantize(
        mlp_pt2,
        config(loss="mse", activation_observer="minmax", learning_rate=1e-4, batch_size=16),
        out_dir=tmp_path / "out",
        train=data,
    )
    assert result.metrics["layers"]["quantized"] == 3
    assert "accuracy" not in result.metrics  # regression targets are not class labels


def test_cross_entropy_needs_class_indices(mlp_pt2: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.npz"
    np.savez(data, x=np.zeros((8, WIDTH), np.float32), labels=np.zeros((8, 10), np.float32))
    with pytest.raises(EngineError) as info:
        quantize(mlp_pt2, config(), out_dir=tmp_path / "out", train=data)
    assert info.value.code == "dataset_mismatch"
    assert "class indices" in info.value.message


def test_torchscript_has_no_qat(cnn_ts: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        quantize(cnn_ts, config(), out_dir=tmp_path, input_shapes={"x": [None, 3, IMAGE, IMAGE]})
    assert info.value.code == "unsupported_combination"
    assert info.value.message.startswith(
        "QAT needs a .pt2 (torch.export) upload: TorchScript graph mode has no QAT"
    )


def test_labels_are_required(cnn_pt2: Path, cnn_calib: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        quantize(cnn_pt2, config(), out_dir=tmp_path)
    assert info.value.code == "labels_required"
    with pytest.raises(EngineError) as info:
        quantize(cnn_pt2, config(), out_dir=tmp_path, train=cnn_calib)  # x only
    assert info.value.code == "labels_required"
    assert "'labels'" in info.value.message


def test_observers_and_batch_norm_freeze_part_of_the_way(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[int] = []
    frozen: dict[str, int] = {}
    freeze_bn = torch.ao.nn.intrinsic.qat.freeze_bn_stats

    def spy(name: str, original: Any) -> Any:
        def wrapped(module: torch.nn.Module) -> Any:
            frozen.setdefault(name, len(steps))  # the training steps done when it first ran
            return original(module)

        return wrapped

    monkeypatch.setattr(
        torch.ao.quantization, "disable_observer", spy("observers", torch.ao.quantization.disable_observer)
    )
    monkeypatch.setattr(torch.ao.nn.intrinsic.qat, "freeze_bn_stats", spy("batch_norm", freeze_bn))
    quantize(
        digits.pt2,
        config(freeze_observers_after=0.25, learning_rate=1e-3),
        out_dir=tmp_path,
        train=digits.train,
        progress=lambda stage, percent, message: steps.append(1) if stage == "training" else None,
    )
    assert frozen == {"observers": 43 // 4, "batch_norm": 43 // 4}  # floor(0.25 * 43 steps)
