"""Per-layer SQNR: real quantized layers compared one at a time, worst first, with a warning for a bad one."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qaas.contract.jobs import DynamicConfig, StaticConfig
from tests.engine.conftest import FAST_BENCHMARK, MLP, WIDTH, export_pt2
from tests.engine.conftest_static import IMAGE
from workers.engine.api import quantize
from workers.engine.checks.layers import LOW_SQNR_DB, Measured, ProgramProbe, measure_layers
from workers.engine.checks.verify import SQNR_CAP_DB
from workers.engine.cpu import supported_backends

pytest_plugins = ["tests.engine.conftest_static"]

OUTLIER = 1000.0


class Outlier(nn.Module):
    """`side` has one huge weight on an input that is always 0 (a dead ReLU unit): harmless in float, but a
    per-tensor int8 scale that fits it rounds every other weight of the layer to zero. Its output is scaled
    down before the sum, so the model as a whole still passes verification."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.stem = nn.Linear(32, 64)
        self.main = nn.Linear(64, 64)
        self.side = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)
        with torch.no_grad():
            self.stem.weight[0].zero_()
            self.stem.bias[0] = -1.0  # unit 0 is never positive: 0 after the ReLU
            self.side.weight[0, 0] = OUTLIER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.head(torch.relu(self.main(h)) + 0.05 * self.side(h))


@pytest.fixture(scope="session")
def outlier_pt2(models_dir: Path) -> Path:
    return export_pt2(Outlier().eval(), torch.randn(2, 32), models_dir / "outlier.pt2")


def check_rows(rows: list[dict[str, Any]], names: set[str], types: set[str]) -> None:
    """Real layer names, one row each, worst first, finite numbers below the cap."""
    assert {row["name"] for row in rows} == names and len(rows) == len(names)
    assert {row["type"] for row in rows} == types
    values = [row["sqnr_db"] for row in rows]
    assert values == sorted(values)
    assert all(math.isfinite(v) and v < SQNR_CAP_DB for v in values)


@pytest.mark.parametrize(
    "config",
    [
        DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        StaticConfig(backend="fbgemm", benchmark=FAST_BENCHMARK, weight_granularity="per_tensor"),
    ],
    ids=["dynamic", "static_per_tensor"],
)
def test_a_crushed_layer_comes_first_with_a_warning(config: Any, outlier_pt2: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32))
    result = quantize(outlier_pt2, config, out_dir=tmp_path / "out", calibration=calib)
    layers = result.metrics["layers"]
    rows = layers["per_layer"]
    check_rows(rows, {"stem", "main", "side", "head"}, {"Linear"})
    assert len(rows) == layers["quantized"]
    worst, *others = rows
    assert worst["name"] == "side" and worst["sqnr_db"] < LOW_SQNR_DB
    # Measured one layer at a time: the crushed layer's error does not spill into the head's number.
    assert all(row["sqnr_db"] > 25 for row in others)
    expected = f"layer side (Linear) has {worst['sqnr_db']:.1f} dB SQNR: consider options.exclude=['side']"
    assert expected in result.metrics["warnings"]
    assert result.metrics["fidelity"]["cosine"] >= 0.9  # the job itself is fine

    fixed = quantize(
        outlier_pt2,
        config.model_copy(update={"exclude": ("side",)}),
        out_dir=tmp_path / "fixed",
        calibration=calib,
    )
    check_rows(fixed.metrics["layers"]["per_layer"], {"stem", "main", "head"}, {"Linear"})
    assert not any(w.startswith("layer ") for w in fixed.metrics["warnings"])


def test_numbers_match_a_layer_quantized_by_hand(mlp_pt2: Path, mlp: MLP, tmp_path: Path) -> None:
    """The head's SQNR is what torch.ao's own dynamic Linear gives on the head's float inputs, batch by batch."""
    x = np.random.default_rng(3).standard_normal((64, WIDTH)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    result = quantize(
        mlp_pt2,
        DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        out_dir=tmp_path / "o",
        eval_data=tmp_path / "eval.npz",
    )
    reported = {row["name"]: row["sqnr_db"] for row in result.metrics["layers"]["per_layer"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = "fbgemm"
        head = torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(mlp.head)), {nn.Linear})[0]
    signal = noise = 0.0
    with torch.no_grad():
        for start in range(0, 32, 8):  # the first 4 verification batches of 8
            inputs = mlp.encoder(torch.relu(mlp.stem(torch.from_numpy(x[start : start + 8]))))
            expected, got = mlp.head(inputs).double(), head(inputs).double()
            signal += float(expected.pow(2).sum())
            noise += float((expected - got).pow(2).sum())
    assert reported["head"] == pytest.approx(10 * math.log10(signal / noise), abs=0.05)


def test_static_layers_are_the_fused_groups(cnn_pt2: Path, cnn_calib: Path, tmp_path: Path) -> None:
    """conv+bn+relu is one int8 layer, named after its convolution, compared with the float group's output."""
    result = quantize(
        cnn_pt2,
        StaticConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        out_dir=tmp_path,
        calibration=cnn_calib,
    )
    rows = result.metrics["layers"]["per_layer"]
    check_rows(rows, {"features.0", "features.3", "head"}, {"Conv2d", "Linear"})
    assert all(row["sqnr_db"] > 20 for row in rows)  # a batch norm compared before folding would be far off


@pytest.mark.skipif("x86" not in supported_backends("pt2"), reason="needs torchao (pt2e)")
def test_pt2e_program_layers_pair_with_the_float_program(cnn_pt2: Path, cnn_calib: Path) -> None:
    """The x86 backend's q/dq program: its convolutions fold the batch norms, compared after the float norm."""
    from workers.engine.lowering.x86.pt2e import quantize_pt2e

    program = torch.export.load(str(cnn_pt2))
    batches = [{"x": torch.from_numpy(a)} for a in np.split(np.load(cnn_calib)["x"][:32], 4)]

    def calibrate(prepared: Any) -> None:
        for batch in batches:
            prepared(batch["x"])

    example = (torch.randn(2, 3, IMAGE, IMAGE),)
    quantized = quantize_pt2e(program, mode="static", example_inputs=example, calibrate=calibrate)
    measured = ProgramProbe(program.module(), quantized.program.module()).measure(batches, by_name=False)
    check_rows(measured.rows, {"features.0", "features.3", "head"}, {"Conv2d", "Linear"})
    assert all(row["sqnr_db"] > 20 for row in measured.rows) and measured.failures == {}


def test_torchscript_uploads_say_why_there_are_no_layers(
    cnn_ts: Path, cnn_calib: Path, tmp_path: Path
) -> None:
    result = quantize(
        cnn_ts,
        StaticConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        out_dir=tmp_path,
        calibration=cnn_calib,
        input_shapes={"x": [None, 3, IMAGE, IMAGE]},
    )
    assert result.metrics["layers"]["per_layer"] == []
    notes = [w for w in result.metrics["warnings"] if w.startswith("per-layer SQNR")]
    assert len(notes) == 1 and "TorchScript graph mode" in notes[0]


class Broken:
    def measure(self, batches: Any, *, by_name: bool) -> Measured:
        raise RuntimeError("no luck")


class Partial:
    def measure(self, batches: Any, *, by_name: bool) -> Measured:
        assert len(batches) == 4  # at most the first 4 verification batches
        rows = [
            {"name": "a", "type": "Linear", "sqnr_db": 3.3},
            {"name": "b", "type": "Conv2d", "sqnr_db": 30.0},
        ]
        return Measured(rows, {"c": "TypeError: bad input"})


def test_measure_layers_never_fails_the_job() -> None:
    notes: list[str] = []
    assert measure_layers(None, [], by_name=False, notes=notes) == []
    assert notes == [
        "per-layer SQNR is not available: this backend does not expose its int8 layers one by one"
    ]
    notes = []
    assert measure_layers(Broken(), [{}], by_name=False, notes=notes) == []
    assert notes == ["per-layer SQNR could not be measured (RuntimeError: no luck)"]
    notes = []
    rows = measure_layers(Partial(), [{}] * 8, by_name=False, notes=notes)
    assert [row["name"] for row in rows] == ["a", "b"]
    assert notes == [
        "per-layer SQNR could not be measured for c (TypeError: bad input)",
        "layer a (Linear) has 3.3 dB SQNR: consider options.exclude=['a']",
    ]


def test_recurrent_layers_are_measured(rnn_pt2: Path, tmp_path: Path) -> None:
    result = quantize(rnn_pt2, DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK), out_dir=tmp_path)
    check_rows(result.metrics["layers"]["per_layer"], {"lstm", "gru", "head"}, {"LSTM", "GRU", "Linear"})
