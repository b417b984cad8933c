"""Models and data for the static, QAT and numerics tests; loaded with `pytest_plugins` by those modules.

Apart from tests/engine/conftest.py, which other slices share. The digits model is a real one: a small CNN
trained for about a second on scikit-learn's bundled 8x8 digits (no download) to well over 90% accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.engine.conftest import export_pt2

IMAGE = 16  # the random CNN's input is [N, 3, 16, 16]
DIGITS_EPOCHS = 8


class SmallCNN(nn.Module):
    """Conv-BN-ReLU twice, max pooling and a Linear head; `channels` 1 and `size` 8 fit the digits."""

    def __init__(self, channels: int = 3, size: int = IMAGE, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )  # fmt: skip
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(32 * (size // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def random_cnn() -> SmallCNN:
    """A SmallCNN with non-trivial batch-norm statistics, so that folding them matters."""
    torch.manual_seed(4)
    model = SmallCNN()
    with torch.no_grad():
        for norm in (model.features[1], model.features[4]):
            assert isinstance(norm, nn.BatchNorm2d)
            norm.running_mean.uniform_(-0.2, 0.2)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.1, 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def cnn() -> SmallCNN:
    return random_cnn()


@pytest.fixture(scope="session")
def cnn_pt2(models_dir: Path, cnn: SmallCNN) -> Path:
    return export_pt2(cnn, torch.randn(2, 3, IMAGE, IMAGE), models_dir / "cnn.pt2")


@pytest.fixture(scope="session")
def cnn_ts(models_dir: Path, cnn: SmallCNN) -> Path:
    path = models_dir / "cnn.ts"
    torch.jit.script(cnn).save(str(path))
    return path


@pytest.fixture(scope="session")
def cnn_calib(models_dir: Path) -> Path:
    path = models_dir / "cnn_calib.npz"
    rng = np.random.default_rng(5)
    np.savez(path, x=rng.standard_normal((64, 3, IMAGE, IMAGE)).astype(np.float32))
    return path


@dataclass
class Digits:
    """The trained digits model as a .pt2, its train and test splits (x, labels) and its fp32 test accuracy."""

    model: SmallCNN
    pt2: Path
    train: Path
    test: Path
    accuracy: float


def train_digits(x: np.ndarray, y: np.ndarray, seed: int = 0) -> SmallCNN:
    """A second or so of Adam on the training split."""
    torch.manual_seed(seed)
    model = SmallCNN(channels=1, size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(DIGITS_EPOCHS):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), 64):
            pick = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(xs[pick]), ys[pick])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    from sklearn.datasets import load_digits

    folder = tmp_path_factory.mktemp("digits")
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]  # [1797, 1, 8, 8] in 0..1
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.75 * len(x))
    train, test = order[:cut], order[cut:]
    model = train_digits(x[train], y[train])
    with torch.no_grad():
        accuracy = 100 * float((model(torch.from_numpy(x[test])).argmax(1).numpy() == y[test]).mean())
    np.savez(folder / "train.npz", x=x[train], labels=y[train])
    np.savez(folder / "test.npz", x=x[test], labels=y[test])
    pt2 = export_pt2(model, torch.from_numpy(x[:2]), folder / "digits.pt2")
    return Digits(model, pt2, folder / "train.npz", folder / "test.npz", accuracy)
