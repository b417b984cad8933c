"""Static quantization end to end: both formats, every observer choice, exclusions, errors, real digits."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qaas.contract.jobs import StaticConfig
from tests.engine.conftest import FAST_BENCHMARK, MLP, WIDTH, export_pt2
from tests.engine.conftest_static import IMAGE, Digits, SmallCNN
from workers.engine.api import QuantResult, quantize
from workers.engine.errors import EngineError

pytest_plugins = ["tests.engine.conftest_static"]

CNN_SHAPES = {"x": [None, 3, IMAGE, IMAGE]}
METRIC_KEYS = {"size", "latency", "fidelity", "layers", "environment", "warnings"}


def config(**options: object) -> StaticConfig:
    return StaticConfig(backend="fbgemm", benchmark=FAST_BENCHMARK, **options)  # type: ignore[arg-type]


def load_int8(result: QuantResult) -> torch.jit.ScriptModule:
    torch.backends.quantized.engine = "fbgemm"  # what the load snippet tells users to do
    return torch.jit.load(str(result.artifacts[0].path))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


def assert_per_layer(rows: list[dict[str, Any]], types: dict[str, str]) -> None:
    """One row per quantized layer with its real name and float type, worst SQNR first, finite numbers."""
    assert {row["name"]: row["type"] for row in rows} == types and len(rows) == len(types)
    values = [row["sqnr_db"] for row in rows]
    assert values == sorted(values) and all(10 < v < 200 for v in values)


@pytest.mark.parametrize("fmt", ["pt2", "ts"])
@pytest.mark.parametrize("observer", ["minmax", "histogram"])
@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_cnn_both_formats_every_observer(
    fmt: str, observer: str, granularity: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model: SmallCNN = request.getfixturevalue("cnn")
    path = request.getfixturevalue(f"cnn_{fmt}")
    calib = request.getfixturevalue("cnn_calib")
    stages: list[str] = []
    result = quantize(
        path,
        config(activation_observer=observer, weight_granularity=granularity),
        out_dir=tmp_path,
        calibration=calib,
        input_shapes=CNN_SHAPES if fmt == "ts" else None,
        progress=lambda stage, percent, message: stages.append(stage),
    )
    int8 = load_int8(result)
    assert "quantized::conv2d" in str(int8.inlined_graph)
    for batch in (1, 3):
        x = torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert int8(x).shape == (batch, 10)
            assert cosine(int8(x), model(x)) >= 0.98
    metrics = result.metrics
    assert set(metrics) == METRIC_KEYS  # random calibration data has no labels: no accuracy
    assert metrics["fidelity"]["cosine"] >= 0.98
    layers = metrics["layers"]
    assert (layers["quantized"], layers["float"]) == (3, 0)  # 2 ConvBnReLU, 1 Linear
    if fmt == "pt2":  # each fused group under its convolution's name, worst first
        assert_per_layer(
            layers["per_layer"], {"features.0": "Conv2d", "features.3": "Conv2d", "head": "Linear"}
        )
    else:  # TorchScript graph mode: no layers to observe (a note says so)
        assert layers["per_layer"] == []
    assert metrics["size"]["ratio"] >= 2.5
    assert (
        metrics["size"]["int8_weight_bytes"] + metrics["size"]["int8_code_bytes"]
        < metrics["size"]["int8_bytes"]
    )
    # Timing warnings depend on the host's load; nothing else may warn but the TorchScript per-layer note.
    timing = ("host was busy", "not faster", "per-layer SQNR is not available: TorchScript graph mode")
    assert not [w for w in metrics["warnings"] if not any(t in w for t in timing)]
    assert result.manifest["calibration_samples"] == 64  # 32 batches of 8 asked, 64 samples there
    distinct = [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]]
    assert distinct == [
        "loading",
        "calibrating",
        "converting",
        "saving",
        "verifying",
        "benchmarking",
        "saving",
    ]


def test_manifest_records_versions_seed_and_input_hashes(
    cnn_pt2: Path, cnn_calib: Path, tmp_path: Path
) -> None:
    result = quantize(cnn_pt2, config(seed=3), out_dir=tmp_path, calibration=cnn_calib, eval_data=cnn_calib)
    manifest = result.manifest
    assert manifest["mode"] == "static"
    assert manifest["engine"] == manifest["backend"] == "fbgemm"
    assert manifest["seed"] == 3 and manifest["config"]["seed"] == 3
    assert manifest["torch"] == torch.__version__
    assert "torchao" in manifest
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (cnn_pt2, cnn_calib)}
    assert manifest["files_sha256"] == {
        "model": digest[cnn_pt2], "eval": digest[cnn_calib], "calibration": digest[cnn_calib],
    }  # fmt: skip


@pytest.mark.parametrize("fmt", ["pt2", "ts"])
def test_exclude_by_name_and_by_type(fmt: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    path, calib = request.getfixturevalue(f"cnn_{fmt}"), request.getfixturevalue("cnn_calib")
    shapes = CNN_SHAPES if fmt == "ts" else None
    by_name = quantize(
        path, config(exclude=("features.3",)), out_dir=tmp_path / "a", calibration=calib, input_shapes=shapes
    )
    assert by_name.metrics["layers"]["quantized"] == 2
    assert by_name.metrics["layers"]["float"] >= 1
    graph = str(load_int8(by_name).inlined_graph)
    assert graph.count("quantized::conv2d") == 1 and "aten::conv2d" in graph
    by_type = quantize(
        path,
        config(exclude=("Linear", "nothing")),
        out_dir=tmp_path / "b",
        calibration=calib,
        input_shapes=shapes,
    )
    layers = by_type.metrics["layers"]
    assert (layers["quantized"], layers["float"]) == (2, 1)
    if fmt == "pt2":  # the excluded Linear is float: no int8 row for it
        assert_per_layer(layers["per_layer"], {"features.0": "Conv2d", "features.3": "Conv2d"})
    else:
        assert layers["per_layer"] == []
    assert "aten::linear" in str(load_int8(by_type).inlined_graph)
    assert "exclude entry 'nothing' matched no layer" in by_type.metrics["warnings"]


def test_calibration_data_is_required(cnn_pt2: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        quantize(cnn_pt2, config(), out_dir=tmp_path)
    assert info.value.code == "dataset_required"
    assert "calibration dataset" in info.value.message


def test_few_calibration_samples_are_a_warning(cnn_pt2: Path, tmp_path: Path) -> None:
    calib = tmp_path / "few.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((12, 3, IMAGE, IMAGE)).astype(np.float32))
    result = quantize(cnn_pt2, config(), out_dir=tmp_path / "out", calibration=calib)
    assert any("only 12 calibration samples" in w for w in result.metrics["warnings"])
    assert result.manifest["calibration_samples"] == 12


def test_conv_free_model_quantizes_its_linear_layers(mlp_pt2: Path, mlp: MLP, tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((48, WIDTH)).astype(np.float32))
    result = quantize(
        mlp_pt2, config(activation_observer="moving_average"), out_dir=tmp_path / "o", calibration=calib
    )
    layers = result.metrics["layers"]
    assert (layers["quantized"], layers["float"]) == (3, 0)
    assert_per_layer(layers["per_layer"], {"stem": "Linear", "encoder.0": "Linear", "head": "Linear"})
    graph = str(load_int8(result).inlined_graph)
    assert "quantized::linear_relu" in graph  # the rebuilt torch.relu became nn.ReLU and was fused
    x = torch.randn(3, WIDTH)
    assert cosine(load_int8(result)(x), mlp(x)) >= 0.98


class Normalizer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(x))


def test_nothing_quantized_lists_the_layers(tmp_path: Path) -> None:
    path = export_pt2(Normalizer().eval(), torch.randn(2, 16), tmp_path / "norm.pt2")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(2).standard_normal((32, 16)).astype(np.float32))
    with pytest.raises(EngineError) as info:
        quantize(path, config(), out_dir=tmp_path / "out", calibration=calib)
    assert info.value.code == "nothing_quantized"
    assert "LayerNorm (1)" in info.value.message
    assert not (tmp_path / "out" / "model.int8.ts").exists()


@pytest.mark.parametrize("fmt", ["pt2", "ts"])
def test_everything_excluded_is_nothing_quantized(
    fmt: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    path, calib = request.getfixturevalue(f"cnn_{fmt}"), request.getfixturevalue("cnn_calib")
    with pytest.raises(EngineError) as info:
        quantize(
            path,
            config(exclude=("features", "Linear")),
            out_dir=tmp_path,
            calibration=calib,
            input_shapes=CNN_SHAPES if fmt == "ts" else None,
        )
    assert info.value.code == "nothing_quantized"
    assert "every candidate layer is excluded" in info.value.message
    assert "Conv2d (2)" in info.value.message


def test_decomposed_program(cnn: SmallCNN, cnn_calib: Path, tmp_path: Path) -> None:
    # convolution, _native_batch_norm_legit_no_training and view instead of conv2d, batch_norm and flatten
    path = tmp_path / "decomposed.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(
            cnn, (torch.randn(2, 3, IMAGE, IMAGE),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
        )
        torch.export.save(program.run_decompositions(), str(path))
    result = quantize(path, config(), out_dir=tmp_path / "out", calibration=cnn_calib)
    assert result.metrics["layers"]["quantized"] == 3
    assert result.metrics["fidelity"]["cosine"] >= 0.98
    assert load_int8(result)(torch.randn(5, 3, IMAGE, IMAGE)).shape == (5, 10)


def test_digits_keep_their_accuracy(digits: Digits, tmp_path: Path) -> None:
    assert digits.accuracy >= 90
    result = quantize(digits.pt2, config(), out_dir=tmp_path, calibration=digits.train, eval_data=digits.test)
    accuracy = result.metrics["accuracy"]
    assert accuracy["fp32"] == pytest.approx(digits.accuracy, abs=1e-3)
    assert abs(accuracy["delta"]) <= 1.0
    assert accuracy["delta"] == pytest.approx(accuracy["int8"] - accuracy["fp32"], abs=1e-3)
    assert result.metrics["fidelity"]["top1_agreement"] >= 0.95
    json.dumps(result.to_dict(), allow_nan=False)  # the runner must be able to send it


def test_tracing_fallback_keeps_the_batch_dynamic(
    cnn_pt2: Path, cnn_calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_script(*args: object, **kwargs: object) -> None:
        raise RuntimeError("pretend TorchScript cannot compile this program")

    monkeypatch.setattr(torch.jit, "script", no_script)
    result = quantize(cnn_pt2, config(), out_dir=tmp_path, calibration=cnn_calib)
    assert any("traced, not scripted" in w for w in result.metrics["warnings"])
    assert "fp32_same_build_ms" not in result.metrics["latency"][0]  # the float model could not be scripted
    assert load_int8(result)(torch.randn(5, 3, IMAGE, IMAGE)).shape == (5, 10)
