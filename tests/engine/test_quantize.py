"""Dynamic quantization end to end: the artifact reloads with plain torch, is faithful, small and dynamic."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qaas.contract.jobs import DynamicConfig
from tests.engine.conftest import FAST_BENCHMARK, MLP, WIDTH
from workers.engine.api import QuantResult, quantize
from workers.engine.errors import EngineError


class Bag(torch.nn.Module):
    """Token ids -> mean embedding -> Linear: an int64 input and an Embedding worth quantizing."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(1000, 128)
        self.head = torch.nn.Linear(128, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(1))


METRIC_KEYS = {"size", "latency", "fidelity", "layers", "environment", "warnings"}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    # detached: the float reference model's outputs carry autograd state
    return float(torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


@pytest.fixture(scope="session")
def pt2_run(mlp_pt2: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[QuantResult, list[str]]:
    stages: list[str] = []
    out = tmp_path_factory.mktemp("pt2_out")
    config = DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK)
    result = quantize(
        mlp_pt2, config, out_dir=out, progress=lambda stage, percent, message: stages.append(stage)
    )
    return result, stages


@pytest.fixture(scope="session")
def pt2_result(pt2_run: tuple[QuantResult, list[str]]) -> QuantResult:
    return pt2_run[0]


@pytest.fixture(scope="session")
def ts_result(mlp_ts: Path, tmp_path_factory: pytest.TempPathFactory) -> QuantResult:
    out = tmp_path_factory.mktemp("ts_out")
    return quantize(
        mlp_ts,
        DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        out_dir=out,
        input_shapes={"x": [None, WIDTH]},
    )


def artifact(result: QuantResult) -> Path:
    return next(a.path for a in result.artifacts if a.name == "model.int8.ts")


@pytest.mark.parametrize("which", ["pt2_result", "ts_result"])
def test_artifact_is_faithful_small_and_dynamic(which: str, mlp: MLP, request: pytest.FixtureRequest) -> None:
    result: QuantResult = request.getfixturevalue(which)
    torch.backends.quantized.engine = "fbgemm"
    int8 = torch.jit.load(str(artifact(result)))  # plain torch: no qaas code needed to use it
    for batch in (1, 3):
        x = torch.randn(batch, WIDTH, generator=torch.Generator().manual_seed(100 + batch))
        with torch.no_grad():
            assert int8(x).shape == (batch, 10)
            assert cosine(int8(x), mlp(x)) >= 0.99
    metrics = result.metrics
    assert set(metrics) == METRIC_KEYS
    assert metrics["size"]["ratio"] >= 3
    assert metrics["size"]["int8_bytes"] == artifact(result).stat().st_size
    assert metrics["fidelity"]["cosine"] >= 0.99
    assert metrics["fidelity"]["top1_agreement"] is not None
    layers = metrics["layers"]
    assert (layers["quantized"], layers["float"]) == (3, 0)
    if which == "pt2_result":  # one row per quantized layer, under the MLP's own names, worst first
        rows = layers["per_layer"]
        assert sorted(row["name"] for row in rows) == ["encoder.0", "head", "stem"]
        assert {row["type"] for row in rows} == {"Linear"}
        assert [row["sqnr_db"] for row in rows] == sorted(row["sqnr_db"] for row in rows)
        assert all(20 < row["sqnr_db"] < 200 for row in rows)
    else:  # TorchScript graph mode has no layers to observe, and says so
        assert layers["per_layer"] == []
        assert any(w.startswith("per-layer SQNR is not available") for w in metrics["warnings"])
    assert [row["batch_size"] for row in metrics["latency"]] == [1, 4]
    assert result.backend == "fbgemm"


def test_metrics_and_manifest_shapes(pt2_result: QuantResult, mlp_pt2: Path) -> None:
    row = pt2_result.metrics["latency"][0]
    assert set(row) == {
        "batch_size", "threads", "fp32_ms", "int8_ms", "speedup", "fp32_same_build_ms", "speedup_same_build",
    }  # fmt: skip
    assert set(row["fp32_ms"]) == set(row["fp32_same_build_ms"]) == {"p50", "p95"}
    env = pt2_result.metrics["environment"]
    assert set(env) == {"cpu", "isa", "torch", "engine", "threads", "load_average", "bench_lock_wait_s"}
    assert env["engine"] == "fbgemm"
    assert set(env["isa"]) <= {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"}
    manifest = pt2_result.manifest
    assert manifest["qaas_engine"] == "0.1"
    assert manifest["mode"] == "dynamic"
    assert manifest["config"]["benchmark"]["batch_sizes"] == [1, 4]
    assert manifest["inputs"] == [{"name": "x", "shape": [None, WIDTH], "dtype": "float32"}]
    assert manifest["input_sha256"] == hashlib.sha256(mlp_pt2.read_bytes()).hexdigest()
    assert 'torch.jit.load("model.int8.ts")' in pt2_result.load_snippet
    # Only the model: the worker writes report.json and manifest.json from the result and stores them itself.
    assert [(a.name, a.format) for a in pt2_result.artifacts] == [("model.int8.ts", "torchscript")]
    assert (
        pt2_result.artifacts[0].sha256
        == hashlib.sha256(pt2_result.artifacts[0].path.read_bytes()).hexdigest()
    )
    json.dumps(pt2_result.to_dict(), allow_nan=False)  # the runner must be able to send it


def test_progress_stages(pt2_run: tuple[QuantResult, list[str]]) -> None:
    stages = pt2_run[1]
    order = ["loading", "converting", "saving", "verifying", "benchmarking"]
    assert [s for i, s in enumerate(stages) if i == 0 or s != stages[i - 1]][:5] == order
    assert stages[-1] == "saving"


def test_recurrent_layers_are_quantized_from_pt2(rnn_pt2: Path, tmp_path: Path) -> None:
    result = quantize(rnn_pt2, DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK), out_dir=tmp_path)
    assert result.metrics["layers"]["quantized"] == 3  # LSTM, GRU and the Linear head
    assert result.metrics["fidelity"]["cosine"] >= 0.99
    assert result.metrics["size"]["ratio"] >= 3
    int8 = torch.jit.load(str(artifact(result)))
    graph = str(int8.inlined_graph)
    assert "aten::quantized_lstm" in graph and "aten::quantized_gru" in graph
    for batch in (1, 3):
        assert int8(torch.randn(batch, 6, 32)).shape == (batch, 5)


def test_decomposed_programs_and_embeddings(models_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = Bag().eval()
    ids = torch.randint(0, 1000, (2, 7))
    path = models_dir / "bag_decomposed.pt2"
    with warnings.catch_warnings():  # torch warns about its own pytree internals while decomposing
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (ids,), dynamic_shapes={"ids": {0: torch.export.Dim("batch")}})
        torch.export.save(program.run_decompositions(), str(path))  # linear becomes addmm(b, x, permute(w))
    config = DynamicConfig(backend="fbgemm", quantize_embeddings=True, benchmark=FAST_BENCHMARK)
    result = quantize(path, config, out_dir=tmp_path)
    assert result.metrics["layers"]["quantized"] == 2  # the Embedding and the Linear
    assert result.metrics["size"]["ratio"] >= 3
    assert result.metrics["fidelity"]["cosine"] >= 0.99
    int8 = torch.jit.load(str(artifact(result)))
    fresh = torch.randint(0, 1000, (3, 7))
    assert cosine(int8(fresh), model(fresh)) >= 0.99


def test_exclude_keeps_layers_in_float(mlp_pt2: Path, tmp_path: Path) -> None:
    config = DynamicConfig(backend="fbgemm", exclude=("head", "nothing.here"), benchmark=FAST_BENCHMARK)
    result = quantize(mlp_pt2, config, out_dir=tmp_path)
    assert result.metrics["layers"]["quantized"] == 2
    assert result.metrics["layers"]["float"] == 1
    assert "exclude entry 'nothing.here' matched no layer" in result.metrics["warnings"]


def test_exclude_by_type_in_torchscript(mlp_ts: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        quantize(
            mlp_ts,
            DynamicConfig(backend="fbgemm", exclude=("Linear",)),
            out_dir=tmp_path,
            input_shapes={"x": [None, WIDTH]},
        )
    assert info.value.code == "nothing_quantized"


def test_conv_only_model_quantizes_nothing(conv_pt2: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        quantize(conv_pt2, DynamicConfig(backend="fbgemm"), out_dir=tmp_path)
    assert info.value.code == "nothing_quantized"
    assert "no Linear, LSTM or GRU layer found to quantize dynamically" in info.value.message
    assert not (tmp_path / "model.int8.ts").exists()


def test_verification_uses_evaluation_data(mlp_pt2: Path, tmp_path: Path) -> None:
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((20, WIDTH)).astype(np.float64))
    result = quantize(
        mlp_pt2,
        DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK),
        out_dir=tmp_path / "out",
        eval_data=data,
    )
    assert result.metrics["fidelity"]["cosine"] >= 0.99
    assert not any("random inputs" in w for w in result.metrics["warnings"])


def test_mismatched_data_is_refused_before_converting(mlp_pt2: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((4, 3, 28, 28), np.float32))
    with pytest.raises(EngineError) as info:
        quantize(mlp_pt2, DynamicConfig(backend="fbgemm"), out_dir=tmp_path / "out", calibration=data)
    assert info.value.code == "dataset_mismatch"
    assert (
        info.value.message
        == f"calibration tensor 'x' has shape [4, 3, 28, 28], the model expects [N, {WIDTH}]"
    )


def test_tracing_fallback_keeps_the_batch_dynamic(
    mlp_pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_script(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("pretend TorchScript cannot compile this program")

    monkeypatch.setattr(torch.jit, "script", no_script)
    result = quantize(mlp_pt2, DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK), out_dir=tmp_path)
    assert any("traced, not scripted" in w for w in result.metrics["warnings"])
    int8 = torch.jit.load(str(artifact(result)))
    assert int8(torch.randn(5, WIDTH)).shape == (5, 10)


def test_embeddings_need_a_program(mlp_ts: Path, tmp_path: Path) -> None:
    config = DynamicConfig(backend="fbgemm", quantize_embeddings=True)
    with pytest.raises(EngineError) as info:
        quantize(mlp_ts, config, out_dir=tmp_path, input_shapes={"x": [None, WIDTH]})
    assert info.value.code == "unsupported_combination"


def test_a_fixed_batch_is_benchmarked_as_it_is(mlp: MLP, tmp_path: Path) -> None:
    path = tmp_path / "fixed.pt2"
    torch.export.save(
        torch.export.export(mlp, (torch.randn(1, WIDTH),)), str(path)
    )  # no Dim: batch fixed at 1
    config = DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK)  # asks for batches 1 and 4
    result = quantize(path, config, out_dir=tmp_path / "out")
    assert [row["batch_size"] for row in result.metrics["latency"]] == [1]
    assert "the model has a fixed batch size of 1: benchmarked at 1 only" in result.metrics["warnings"]


def test_an_unfaithful_result_fails_verification_and_leaves_no_artifact(tmp_path: Path) -> None:
    # One huge input feature that the layer ignores sets the activation scale: the others round to zero.
    layer = torch.nn.Linear(16, 4, bias=False)
    with torch.no_grad():
        layer.weight[:, 0] = 0
    path = tmp_path / "outlier.pt2"
    torch.export.save(
        torch.export.export(
            layer.eval(), (torch.randn(2, 16),), dynamic_shapes={"input": {0: torch.export.Dim("b")}}
        ),
        str(path),
    )
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    x[:, 0] = 1e6
    np.savez(tmp_path / "eval.npz", x=x)
    with pytest.raises(EngineError) as info:
        quantize(
            path, DynamicConfig(backend="fbgemm"), out_dir=tmp_path / "out", eval_data=tmp_path / "eval.npz"
        )
    assert info.value.code == "verification_failed"
    assert "options.exclude" in info.value.message
    assert not (tmp_path / "out" / "model.int8.ts").exists()
