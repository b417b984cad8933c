"""Every cell of the support matrix (format × mode × backend), run once per session through `quantize`.

Load with `pytest_plugins = ["tests.engine.conftest_static", "tests.engine.conftest_hf",
"tests.engine.conftest_matrix"]`. Tiny models (the MLP, the 16×16 CNN, a 2-layer BERT), few calibration and
training batches, 3 timed iterations: the AOTInductor compiles of the x86 `.pt2` cells dominate.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qaas.contract.jobs import DynamicConfig, QATConfig, QATOptions, StaticConfig
from tests.engine.conftest import FAST_BENCHMARK, WIDTH
from tests.engine.conftest_static import IMAGE
from workers.engine.api import QuantResult, quantize
from workers.engine.errors import EngineError
from workers.engine.inputs.io import load_model

TRAIN_SAMPLES = 32
SUFFIXES = {"pt2": "pt2", "torchscript": "ts"}


@dataclass
class Cell:
    """One quantize() call: its result or its error, and the output folder."""

    fmt: str
    mode: str
    backend: str
    out: Path
    result: QuantResult | None = None
    error: EngineError | None = None
    seconds: float = 0.0


def config_for(mode: str, backend: str, **changes: Any) -> Any:
    """The config a cell uses: cheap observers, 4 calibration batches of 8, one short epoch of QAT."""
    if mode == "dynamic":
        return DynamicConfig(backend=backend, benchmark=FAST_BENCHMARK, **changes)
    common: dict[str, Any] = {
        "backend": backend,
        "activation_observer": "minmax",
        "calibration_batches": 4,
        "batch_size": 8,
        "benchmark": FAST_BENCHMARK,
    }
    if mode == "static":
        return StaticConfig(**(common | changes))
    common |= {"activation_observer": "moving_average", "qat": QATOptions(epochs=1, batch_size=16)}
    return QATConfig(**(common | changes))


@pytest.fixture(scope="session")
def cnn_train(models_dir: Path) -> Path:
    """A labelled training set for the random CNN (class indices 0..9)."""
    path = models_dir / "cnn_train.npz"
    rng = np.random.default_rng(6)
    x = rng.standard_normal((TRAIN_SAMPLES, 3, IMAGE, IMAGE)).astype(np.float32)
    np.savez(path, x=x, labels=rng.integers(0, 10, TRAIN_SAMPLES).astype(np.int64))
    return path


@dataclass
class CellInputs:
    """The files each (format, mode) uses, and the float models its artifacts are compared with."""

    files: dict[str, Path]
    references: dict[str, Any]


@pytest.fixture(scope="session")
def cell_inputs(
    mlp_pt2: Path,
    mlp_ts: Path,
    cnn_pt2: Path,
    cnn_ts: Path,
    cnn_calib: Path,
    cnn_train: Path,
    hf_zip: Path,
    mlp: Any,
    cnn: Any,
) -> CellInputs:
    files = {
        "mlp_pt2": mlp_pt2,
        "mlp_ts": mlp_ts,
        "cnn_pt2": cnn_pt2,
        "cnn_ts": cnn_ts,
        "calibration": cnn_calib,
        "train": cnn_train,
        "hf": hf_zip,
    }
    return CellInputs(files, {"mlp": mlp, "cnn": cnn, "hf": load_model(hf_zip).module})


def cell_arguments(inputs: CellInputs, fmt: str, mode: str) -> tuple[Path, dict[str, Any]]:
    """(model file, quantize keyword arguments) for a cell; KeyError for a cell no test knows yet."""
    files = inputs.files
    net = "mlp" if mode == "dynamic" else "cnn"
    model = files["hf"] if fmt == "hf" else files[f"{net}_{SUFFIXES[fmt]}"]
    kwargs: dict[str, Any] = {}
    if fmt == "torchscript":
        kwargs["input_shapes"] = {"x": [None, WIDTH] if mode == "dynamic" else [None, 3, IMAGE, IMAGE]}
    if mode in ("static", "qat"):  # QAT: the observers start from calibrated ranges, then train
        kwargs["calibration"] = files["calibration"]
    if mode == "qat":
        kwargs["train"] = files["train"]
    return model, kwargs


def sample_inputs(
    inputs: CellInputs, fmt: str, mode: str, batch: int
) -> tuple[Any, tuple[torch.Tensor, ...]]:
    """(float reference, positional inputs) of a given batch for comparing a cell's artifact."""
    generator = torch.Generator().manual_seed(1000 + batch)
    if fmt == "hf":
        ids = torch.randint(0, 200, (batch, 7), generator=generator)
        mask = torch.ones_like(ids)
        mask[-1, 4:] = 0
        return inputs.references["hf"], (ids, mask)
    if mode == "dynamic":
        return inputs.references["mlp"], (torch.randn(batch, WIDTH, generator=generator),)
    return inputs.references["cnn"], (torch.randn(batch, 3, IMAGE, IMAGE, generator=generator),)


def reload(result: QuantResult) -> Callable[..., Any]:
    """The artifact loaded the way its load snippet says, with plain torch."""
    artifact = result.artifacts[0]
    if artifact.format == "aoti_package":
        os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
        return torch._inductor.aoti_load_package(str(artifact.path))  # type: ignore[no-any-return]
    torch.backends.quantized.engine = result.manifest["engine"]
    return torch.jit.load(str(artifact.path))  # type: ignore[no-any-return]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.detach().flatten(), b.detach().flatten(), dim=0))


@pytest.fixture(scope="session")
def run_cell(cell_inputs: CellInputs, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Cell]:
    """run_cell(fmt, mode, backend) -> Cell, each cell quantized once per session."""
    import time

    cache: dict[tuple[str, str, str], Cell] = {}

    def run(fmt: str, mode: str, backend: str) -> Cell:
        key = (fmt, mode, backend)
        if key not in cache:
            model, kwargs = cell_arguments(cell_inputs, fmt, mode)
            cell = Cell(fmt, mode, backend, tmp_path_factory.mktemp(f"cell-{fmt}-{mode}-{backend}"))
            started = time.perf_counter()
            try:
                cell.result = quantize(model, config_for(mode, backend), out_dir=cell.out, **kwargs)
            except EngineError as exc:
                cell.error = exc
            cell.seconds = time.perf_counter() - started
            cache[key] = cell
        return cache[key]

    return run
