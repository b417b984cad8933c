"""Tiny models and files for the engine tests, built once per session in a temporary folder."""

from __future__ import annotations

import io
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qaas.contract.jobs import BenchmarkConfig, DynamicConfig
from tests.engine.conftest_inductor import inductor_cache  # noqa: F401  (autouse: one Inductor cache)

WIDTH = 256  # big enough that the int8 weights dominate the file and the size ratio passes 3
FAST_BENCHMARK = BenchmarkConfig(batch_sizes=(1, 4), threads=1, iterations=3)


class MLP(nn.Module):
    """Three Linear layers in a nested layout, so that module paths like "encoder.0" appear."""

    def __init__(self, width: int = WIDTH, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.encoder = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(torch.relu(self.stem(x))))


class Recurrent(nn.Module):
    """An LSTM (2 layers) feeding a bidirectional GRU and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(32, 128, num_layers=2, batch_first=True)
        self.gru = nn.GRU(128, 64, batch_first=True, bidirectional=True)
        self.head = nn.Linear(128, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        out, _ = self.gru(out)
        return self.head(out[:, -1])


class ConvOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).flatten(1)


def export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export the way users are told to (docs/engine-notes.md#export-with-a-dynamic-batch): an example batch
    of 2 and a dynamic batch dimension."""
    batch = torch.export.Dim("batch")
    with (
        warnings.catch_warnings()
    ):  # export warns about nn.LSTM's flat weights; nothing to fix in a test model
        warnings.simplefilter("ignore")
        program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp() -> MLP:
    torch.manual_seed(0)
    return MLP().eval()


@pytest.fixture(scope="session")
def mlp_pt2(models_dir: Path, mlp: MLP) -> Path:
    return export_pt2(mlp, torch.randn(2, WIDTH), models_dir / "mlp.pt2")


@pytest.fixture(scope="session")
def mlp_ts(models_dir: Path, mlp: MLP) -> Path:
    path = models_dir / "mlp.ts"
    torch.jit.script(mlp).save(str(path))
    return path


@pytest.fixture(scope="session")
def rnn_pt2(models_dir: Path) -> Path:
    torch.manual_seed(1)
    return export_pt2(Recurrent(), torch.randn(2, 6, 32), models_dir / "rnn.pt2")


@pytest.fixture(scope="session")
def conv_pt2(models_dir: Path) -> Path:
    torch.manual_seed(2)
    return export_pt2(ConvOnly(), torch.randn(2, 3, 8, 8), models_dir / "conv.pt2")


@pytest.fixture(scope="session")
def pickled_model(models_dir: Path, mlp: MLP) -> Path:
    path = models_dir / "model.pt"
    torch.save(mlp, str(path))
    return path


@pytest.fixture
def random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "weights.pt2"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 1234, dtype=np.uint8).tobytes())
    return path


def make_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


@pytest.fixture
def plain_zip(tmp_path: Path) -> Path:
    return make_zip(tmp_path / "model.pt2", {"a.txt": b"hello", "b.bin": b"\x00" * 10})


@pytest.fixture
def native_zip(tmp_path: Path) -> Path:
    return make_zip(
        tmp_path / "model.pt2", {"m/archive_format": b"pt2", "m/models/model.json": b"{}", "lib.so": b"ELF"}
    )


class Sneaky:
    """Unpickling this would call os.getpid: harmless, but proof that arbitrary code ran."""

    def __reduce__(self) -> tuple:
        import os

        return (os.getpid, ())


def rewrite_zip(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """Copy an archive entry by entry, replacing some entries."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info.filename)))
    return target


@pytest.fixture
def pt2_with_pickled_weight(tmp_path: Path, mlp_pt2: Path) -> Path:
    """The MLP program with one weight turned into a malicious pickle, as torch.export.load would unpickle it."""
    import json

    with zipfile.ZipFile(mlp_pt2) as zf:
        prefix = next(n.split("/")[0] for n in zf.namelist() if n.endswith("/archive_format"))
        config_name = f"{prefix}/data/weights/model_weights_config.json"
        config = json.loads(zf.read(config_name))
    fqn = next(iter(config["config"]))
    config["config"][fqn]["use_pickle"] = True
    path_name = config["config"][fqn]["path_name"]
    buffer = io.BytesIO()
    pickle.dump(Sneaky(), buffer)
    replace = {
        config_name: json.dumps(config).encode(),
        f"{prefix}/data/weights/{path_name}": buffer.getvalue(),
    }
    return rewrite_zip(mlp_pt2, tmp_path / "evil.pt2", replace)


@pytest.fixture
def fast_config() -> DynamicConfig:
    return DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK)
