"""The x86 backend through quantize(): what a `.pt2` job's AOTInductor package says about itself, and that it
loads in a fresh process with plain torch. The packages are the matrix cells' (compiled once per session)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.engine.conftest_matrix import Cell, config_for, cosine
from tests.engine.conftest_static import SmallCNN
from workers.engine.api import QuantResult, quantize
from workers.engine.cpu import cpu_info, supported_backends
from workers.engine.errors import EngineError

pytest_plugins = ["tests.engine.conftest_static", "tests.engine.conftest_hf", "tests.engine.conftest_matrix"]

needs_pt2e = pytest.mark.skipif(
    "x86" not in supported_backends("pt2"), reason="needs torchao and a C++ compiler (AOTInductor)"
)
FRESH_PROCESS = """
import os, sys, torch
os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
model = torch._inductor.aoti_load_package(sys.argv[1])
generator = torch.Generator().manual_seed(0)
outputs = {}
for batch in (1, 3):
    x = torch.randn(batch, 3, 16, 16, generator=generator)
    outputs[batch] = (x, model(x))
torch.save(outputs, sys.argv[2])
try:
    model(torch.randn(2, 3, 17, 16))
    print("unchecked")
except RuntimeError:
    print("checked")
print(",".join(sorted(m for m in ("workers", "torchao", "transformers") if m in sys.modules)) or "-")
"""


@pytest.fixture(scope="module")
def static_x86(run_cell: Callable[..., Cell]) -> QuantResult:
    cell = run_cell("pt2", "static", "x86")
    assert cell.error is None and cell.result is not None, cell.error
    return cell.result


@needs_pt2e
def test_the_package_loads_in_a_fresh_process_with_plain_torch(
    static_x86: QuantResult, cnn: SmallCNN, tmp_path: Path
) -> None:
    package, saved = static_x86.artifacts[0].path, tmp_path / "outputs.pt"
    run = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(package), str(saved)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["checked", "-"]  # shapes checked; no qaas, torchao or transformers needed
    for batch, (x, y) in torch.load(saved).items():
        assert y.shape == (batch, 10)
        with torch.no_grad():
            assert cosine(y, cnn(x)) >= 0.98


@needs_pt2e
def test_the_report_of_an_aoti_job(static_x86: QuantResult) -> None:
    metrics, manifest = static_x86.metrics, static_x86.manifest
    assert static_x86.artifacts[0].format == "aoti_package"
    size = metrics["size"]
    assert size["int8_weight_bytes"] > 0 and size["int8_code_bytes"] > 0
    assert size["int8_weight_bytes"] + size["int8_code_bytes"] <= size["int8_bytes"]
    for row in metrics["latency"]:
        assert row["fp32_same_build_ms"]["p50"] > 0 and row["speedup_same_build"] > 0
    assert metrics["layers"]["quantized"] == 3 and metrics["layers"]["float"] == 0
    assert manifest["engine"] == metrics["environment"]["engine"] == "x86_inductor"
    assert manifest["compiled_on"]["isa"] == cpu_info()["isa"]
    snippet = static_x86.load_snippet
    assert 'os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"' in snippet
    assert 'torch._inductor.aoti_load_package("model.int8.aoti.pt2")' in snippet
    assert f"torch {torch.__version__}" in snippet and ", ".join(cpu_info()["isa"]) in snippet


def test_per_tensor_weights_on_x86_are_refused_before_any_work(cnn_pt2: Path, tmp_path: Path) -> None:
    config = config_for("static", "x86", weight_granularity="per_tensor")
    with pytest.raises(EngineError) as info:
        quantize(cnn_pt2, config, out_dir=tmp_path / "out", calibration=tmp_path / "missing.npz")
    assert info.value.code == "unsupported_combination"
    assert "weight_granularity per_channel, or backend fbgemm" in info.value.message
    assert not (tmp_path / "out").exists()


def test_torchscript_on_the_x86_engine_says_so(run_cell: Callable[..., Cell]) -> None:
    result = run_cell("torchscript", "static", "x86").result
    assert result is not None
    assert result.manifest["engine"] == result.metrics["environment"]["engine"] == "x86"
    assert 'torch.backends.quantized.engine = "x86"' in result.load_snippet
    assert result.metrics["layers"]["quantized"] >= 3
