"""backend "auto": every candidate quantized, verified and timed on this CPU; the winner kept, the others deleted.

The `.pt2` runs reuse the matrix cells (conftest_matrix.run_cell), so that their AOTInductor compiles happen
once per session; the wiring tests use TorchScript models (both candidates TorchScript: no compile) and a
fake measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from qaas.contract.jobs import DynamicConfig
from tests.engine.conftest import FAST_BENCHMARK, WIDTH, export_pt2
from tests.engine.conftest_matrix import Cell, config_for
from workers.engine import backends
from workers.engine.api import quantize
from workers.engine.cpu import supported_backends
from workers.engine.errors import EngineError

pytest_plugins = ["tests.engine.conftest_static", "tests.engine.conftest_hf", "tests.engine.conftest_matrix"]

X86_PT2 = "x86" in supported_backends("pt2")
TS_SHAPES = {"x": [None, WIDTH]}


@pytest.mark.skipif(not X86_PT2, reason="needs torchao and a C++ compiler (AOTInductor)")
@pytest.mark.parametrize(("mode", "model"), [("static", "CNN"), ("dynamic", "MLP")])
def test_auto_measures_both_candidates_on_this_cpu(
    mode: str, model: str, run_cell: Callable[..., Cell]
) -> None:
    cell = run_cell("pt2", mode, "auto")
    assert cell.error is None, cell.error
    result = cell.result
    assert result is not None
    table, reason = result.metrics["backends"], result.metrics["backend_choice"]
    print(f"\nauto, {model} {mode}: {result.backend} in {cell.seconds:.1f} s; {table}; {reason}")
    assert set(table) == {"fbgemm", "x86"}
    for name, artifact in (("fbgemm", "model.int8.ts"), ("x86", "model.int8.aoti.pt2")):
        assert table[name]["int8_ms_p50"] > 0 and table[name]["cosine"] >= 0.98
        assert table[name]["artifact"] == artifact
    kept = table[result.backend]["artifact"]
    assert sorted(p.name for p in cell.out.iterdir()) == [kept]  # only the winner's artifact
    assert result.artifacts[0].name == kept and result.manifest["backend"] == result.backend
    assert reason.startswith(("fbgemm", "x86")) and " ms" in reason and reason.endswith("on this CPU")
    faster = min(table, key=lambda n: table[n]["int8_ms_p50"])
    slower = max(table, key=lambda n: table[n]["int8_ms_p50"])
    if table[slower]["int8_ms_p50"] > 1.1 * table[faster]["int8_ms_p50"]:
        assert result.backend == faster  # beyond the 10 % tie, speed decides


def _fake_timings(numbers: dict[str, float]) -> Callable[..., dict[str, float]]:
    def measure(job: Any, built: dict[str, Any]) -> dict[str, float]:
        assert sorted(built) == sorted(numbers)
        return {name: numbers[name] for name in built}

    return measure


@pytest.mark.parametrize(
    ("timings", "winner"),
    [({"fbgemm": 2.0, "x86": 1.0}, "x86"), ({"fbgemm": 1.0, "x86": 3.0}, "fbgemm")],
)
def test_selection_wiring_with_a_fake_measurement(
    timings: dict[str, float], winner: str, mlp_ts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backends, "time_candidates", _fake_timings(timings))
    progress: list[float] = []
    result = quantize(
        mlp_ts,
        DynamicConfig(backend="auto", benchmark=FAST_BENCHMARK),
        out_dir=tmp_path,
        input_shapes=TS_SHAPES,
        progress=lambda stage, percent, message: progress.append(percent),
    )
    assert result.backend == winner
    table = result.metrics["backends"]
    assert {name: row["int8_ms_p50"] for name, row in table.items()} == timings
    assert table[winner]["cosine"] == result.metrics["fidelity"]["cosine"]
    assert result.metrics["backend_choice"].startswith(f"{winner} is the fastest int8 model")
    assert result.manifest["engine"] == result.metrics["environment"]["engine"] == winner
    assert f'torch.backends.quantized.engine = "{winner}"' in result.load_snippet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.ts"]
    assert progress == sorted(progress) and progress[-1] == 100.0


def test_an_option_only_fbgemm_serves_leaves_x86_out_without_building_it(
    cnn_pt2: Path, cnn_calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.engine.lowering.x86 as x86

    def no_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("x86 was built although per-tensor weights exclude it")

    monkeypatch.setattr(x86, "quantize_pt2e", no_build)
    config = config_for("static", "auto", weight_granularity="per_tensor")
    result = quantize(cnn_pt2, config, out_dir=tmp_path, calibration=cnn_calib)
    assert result.backend == "fbgemm"
    error = result.metrics["backends"]["x86"]["error"]
    assert error["code"] == "unsupported_combination" and "per channel" in error["message"]
    assert result.metrics["backends"]["fbgemm"]["int8_ms_p50"] > 0
    assert "fbgemm is the only candidate left (x86: backend x86 quantizes" in result.metrics["backend_choice"]


class LSTMOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(16, 32, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


@pytest.mark.skipif(not X86_PT2, reason="needs torchao and a C++ compiler (AOTInductor)")
def test_a_candidate_that_quantizes_nothing_is_recorded_and_the_other_kept(tmp_path: Path) -> None:
    torch.manual_seed(7)
    path = export_pt2(LSTMOnly().eval(), torch.randn(2, 5, 16), tmp_path / "lstm.pt2")
    result = quantize(path, DynamicConfig(backend="auto", benchmark=FAST_BENCHMARK), out_dir=tmp_path / "out")
    assert result.backend == "fbgemm"  # x86 (pt2e) quantizes Linear only: it fails before any compile
    error = result.metrics["backends"]["x86"]["error"]
    assert (
        error["code"] == "nothing_quantized" and "backend fbgemm quantizes LSTM and GRU" in error["message"]
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.int8.ts"]


def _outlier_model(tmp_path: Path) -> tuple[Path, Path]:
    """A Linear whose ignored first feature is huge: every candidate's int8 output collapses."""
    layer = nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        layer.weight[:, 0] = 0
    path = tmp_path / "outlier.ts"
    torch.jit.script(layer.eval()).save(str(path))
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    x[:, 0] = 1e6
    np.savez(tmp_path / "eval.npz", input=x)
    return path, tmp_path / "eval.npz"


def test_when_every_candidate_fails_the_first_error_is_raised(tmp_path: Path) -> None:
    path, data = _outlier_model(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(EngineError) as info:
        quantize(
            path,
            DynamicConfig(backend="auto", benchmark=FAST_BENCHMARK),
            out_dir=out,
            eval_data=data,
            input_shapes={"input": [None, 16]},
        )
    assert info.value.code == "verification_failed"
    assert list(out.iterdir()) == []  # no candidate folder, no artifact


def test_an_error_about_the_request_stops_auto_at_once(
    mlp_ts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.engine.dynamic as dynamic

    tried: list[str] = []

    def convert(job: Any, config: Any, backend: str) -> Any:
        tried.append(backend)
        raise EngineError("dataset_mismatch", "not about a backend")

    monkeypatch.setattr(dynamic, "_convert", convert)
    with pytest.raises(EngineError) as info:
        quantize(mlp_ts, DynamicConfig(backend="auto"), out_dir=tmp_path, input_shapes=TS_SHAPES)
    assert info.value.code == "dataset_mismatch" and tried == ["fbgemm"]
    assert list(tmp_path.iterdir()) == []


class SharedReLU(nn.Module):
    """One nn.ReLU module called twice, as torchvision's ResNet blocks do: torchao 0.18's x86 quantizer
    raised ValueError ("Input partition has more than one output node") until each call got a path of its own
    (lowering.x86.quantizer.split_shared_activations)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(x))
        y = self.relu(self.conv2(y) + y)
        return self.fc(y.mean(dim=(2, 3)))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@pytest.mark.skipif(not X86_PT2, reason="needs torchao and a C++ compiler (AOTInductor)")
def test_a_shared_activation_module_quantizes_on_x86(tmp_path: Path) -> None:
    from qaas.contract.jobs import StaticConfig

    torch.manual_seed(0)
    path = export_pt2(SharedReLU(), torch.randn(2, 3, 8, 8), tmp_path / "shared.pt2")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 3, 8, 8)).astype(np.float32))
    config = StaticConfig(backend="x86", benchmark=FAST_BENCHMARK, calibration_batches=2)
    result = quantize(path, config, out_dir=tmp_path / "x86", calibration=calib)
    assert (result.backend, result.metrics["layers"]["quantized"], result.metrics["layers"]["float"]) == (
        "x86",
        3,
        0,
    )
    assert result.metrics["fidelity"]["cosine"] > 0.99


@pytest.mark.skipif(not X86_PT2, reason="needs torchao and a C++ compiler (AOTInductor)")
def test_a_model_the_x86_quantizer_cannot_take_is_refused_and_auto_keeps_fbgemm(tmp_path: Path) -> None:
    """torchao 0.18's convert_pt2e fails on nn.TransformerEncoder's fast path (PortNodeMetaForQDQ)."""
    torch.manual_seed(0)
    path = export_pt2(Encoder(), torch.randn(2, 5, 16), tmp_path / "encoder.pt2")
    with pytest.raises(EngineError) as info:
        quantize(path, DynamicConfig(backend="x86", benchmark=FAST_BENCHMARK), out_dir=tmp_path / "x86")
    assert info.value.code == "unsupported_combination"
    assert "use backend fbgemm" in info.value.message and "PortNodeMetaForQDQ" in info.value.message
    result = quantize(
        path, DynamicConfig(backend="auto", benchmark=FAST_BENCHMARK), out_dir=tmp_path / "auto"
    )
    assert result.backend == "fbgemm"
    assert result.metrics["backends"]["x86"]["error"]["code"] == "unsupported_combination"
