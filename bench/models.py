"""The benchmark's models and data: random-weight networks defined here (no downloaded weights), written the
way a user uploads them (a `.pt2` from torch.export with a dynamic batch, or a zipped Hugging Face folder)
with `.npz` calibration and evaluation sets.

    case = cases(quick=True)["resnet18"]
    files = prepare(case, Path("work"))   # model.pt2 / model.zip, calib.npz, eval.npz
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["Case", "Prepared", "cases", "prepare", "tiny_cnn_case"]

CALIBRATION_SEED, EVAL_SEED, BN_SEED = 1, 2, 3
EVAL_SAMPLES = 32
BN_BATCHES = 4


# --- CNNs -----------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()  # used twice, as torchvision does
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's resnet18 layout (11.69M parameters with 1000 classes), defined here."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _conv_bn(
    cin: int, cout: int, kernel: int, stride: int, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [] if expand == 1 else [_conv_bn(cin, hidden, 1, 1)]
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden),
            _conv_bn(hidden, cout, 1, 1, act=False),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 layout at width 1.0 (3.5M parameters with 1000 classes), defined here."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))  # fmt: skip

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(_conv_bn(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class TinyCNN(nn.Module):
    """A few convolutions: the smoke test's model."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_conv_bn(3, 16, 3, 2), _conv_bn(16, 32, 3, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# --- sequence models --------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """nn.TransformerEncoder (post-norm, GELU-free defaults, batch first) on float embeddings [N, T, d]."""

    def __init__(self, d_model: int, heads: int, layers: int, ff: int) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class LSTMNet(nn.Module):
    """A stacked LSTM over [N, T, features]; its outputs at every step."""

    def __init__(self, features: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


def _bert(config: dict[str, Any]) -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**config))


class BertHidden(nn.Module):
    """BertModel as (input_ids, attention_mask) -> last hidden state: what ONNX export and eager timing call."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# --- cases --------------------------------------------------------------------------------------------------

Inputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Case:
    """One benchmarked model: how to build it, its inputs, how the engine and the peer quantize it.

    `fmt` is what is uploaded ("pt2" or "hf"); `mode` "static" or "dynamic"; `backends` the engine backends
    run (each its own job); `make_inputs(n, seed)` the model's named inputs for n samples.
    """

    key: str
    name: str
    mode: str
    fmt: str
    build: Callable[[], nn.Module]
    make_inputs: Callable[[int, int], Inputs]
    backends: tuple[str, ...] = ("fbgemm", "x86")
    calibration_samples: int = 128
    calibration_batch: int = 8
    conv: bool = False  # BatchNorm statistics are re-estimated on the data (as a trained net has them)
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _images(size: int) -> Callable[[int, int], Inputs]:
    def make(n: int, seed: int) -> Inputs:
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((n, 3, size, size), dtype=np.float32)}

    return make


def _sequences(steps: int, features: int) -> Callable[[int, int], Inputs]:
    def make(n: int, seed: int) -> Inputs:
        rng = np.random.default_rng(seed)
        return {"x": rng.standard_normal((n, steps, features), dtype=np.float32)}

    return make


def _tokens(steps: int, vocab: int) -> Callable[[int, int], Inputs]:
    def make(n: int, seed: int) -> Inputs:
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, vocab, size=(n, steps), dtype=np.int64)
        mask = np.ones((n, steps), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": mask}

    return make


BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
BERT_QUICK = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 512}


def cases(*, quick: bool = False) -> dict[str, Case]:
    """The benchmark's models by key; `quick` shrinks inputs (and the transformers) for a smoke run."""
    image = 64 if quick else 224
    # A random-weight MobileNetV2 at 64 px fails the engine's verification (cosine < 0.9): see README.
    mobile_image = 160 if quick else 224
    tokens = 32  # the engine also benchmarks Hugging Face models on 32-token rows
    bert = BERT_QUICK if quick else BERT_BASE
    d_model, heads, layers, ff = (128, 4, 2, 512) if quick else (512, 8, 6, 2048)
    lstm_in, lstm_hidden = (64, 128) if quick else (256, 512)
    calib = 32 if quick else 64  # the histogram observer dominates a static job: 128 doubled it
    all_cases = [
        Case(
            "resnet18",
            "ResNet-18",
            "static",
            "pt2",
            ResNet18,
            _images(image),
            calibration_samples=calib,
            conv=True,
            description=f"ResNet-18 (11.7M params), {image}x{image}",
        ),
        Case(
            "mobilenetv2",
            "MobileNetV2",
            "static",
            "pt2",
            MobileNetV2,
            _images(mobile_image),
            calibration_samples=calib,
            conv=True,
            description=f"MobileNetV2 1.0 (3.5M params), {mobile_image}x{mobile_image}",
        ),
        Case(
            "bert",
            "BERT-base" if not quick else "BERT-tiny",
            "dynamic",
            "hf",
            lambda: _bert(bert),
            _tokens(tokens, 30522),
            calibration_samples=calib,
            description=f"BertModel {bert['num_hidden_layers']}x{bert['hidden_size']}, {tokens} tokens",
            extra={"bert": bert},
        ),
        Case(
            "transformer",
            "nn.TransformerEncoder",
            "dynamic",
            "pt2",
            lambda: Encoder(d_model, heads, layers, ff),
            _sequences(tokens, d_model),
            calibration_samples=calib,
            description=f"{layers} layers, d_model {d_model}, {heads} heads, ff {ff}, {tokens} steps",
        ),
        Case(
            "lstm",
            "LSTM",
            "dynamic",
            "pt2",
            lambda: LSTMNet(lstm_in, lstm_hidden, 2),
            _sequences(tokens, lstm_in),
            backends=("fbgemm",),  # backend x86 keeps LSTM layers float: nothing would be quantized
            calibration_samples=calib,
            description=f"2 layers x {lstm_hidden} hidden, {lstm_in} features, {tokens} steps",
        ),
    ]
    return {case.key: case for case in all_cases}


def tiny_cnn_case() -> Case:
    """A three-layer CNN on 32x32 images: seconds to quantize, for the smoke test."""
    return Case(
        "tiny",
        "TinyCNN",
        "static",
        "pt2",
        TinyCNN,
        _images(32),
        backends=("fbgemm",),
        calibration_samples=32,
        conv=True,
        description="3 layers, 32x32",
    )


# --- files --------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """A case made concrete: the float module, the uploaded file, the datasets and the evaluation inputs."""

    case: Case
    module: nn.Module  # the float model to export to ONNX and to compare against (inputs by name)
    model_path: Path
    calibration: Path
    eval_data: Path
    calibration_inputs: Inputs
    eval_inputs: Inputs
    parameters: int
    weight_bytes: int  # fp32 bytes of the parameters: the size the int8 weights are compared with


def _reestimate_batch_norm(model: nn.Module, make: Callable[[int, int], Inputs], batch: int) -> None:
    """Running statistics from the data, as a trained model has them: random-init BatchNorm (mean 0, var 1)
    would let activations grow through the residual blocks, which no real network does."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for i in range(BN_BATCHES):
            model(torch.from_numpy(make(batch, BN_SEED + i)["x"]))
    model.eval()


def _export_pt2(module: nn.Module, example: Inputs, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    args = tuple(torch.from_numpy(v[:2]) for v in example.values())
    shapes = {name: {0: batch} for name in example}
    program = torch.export.export(module, args, dynamic_shapes=shapes)
    torch.export.save(program, path)


def _save_hf_zip(bert: Any, folder: Path, path: Path) -> None:
    bert.save_pretrained(folder, safe_serialization=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for file in sorted(folder.iterdir()):
            zf.write(file, file.name)


def _save_npz(path: Path, arrays: dict[str, Any]) -> None:
    np.savez(path, **arrays)


def prepare(case: Case, folder: Path, *, seed: int = 0) -> Prepared:
    """Build the model (seeded), write the uploaded file and the .npz datasets into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    built = case.build().eval()
    calibration = case.make_inputs(case.calibration_samples, CALIBRATION_SEED)
    eval_inputs = case.make_inputs(EVAL_SAMPLES, EVAL_SEED)
    if case.conv:
        _reestimate_batch_norm(built, case.make_inputs, max(case.calibration_batch, 16))
    if case.fmt == "hf":
        model_path = folder / "model.zip"
        _save_hf_zip(built, folder / "hf", model_path)
        module: nn.Module = BertHidden(built).eval()
    else:
        model_path = folder / "model.pt2"
        _export_pt2(built, calibration, model_path)
        module = built
    calib_path, eval_path = folder / "calib.npz", folder / "eval.npz"
    _save_npz(calib_path, calibration)
    _save_npz(eval_path, eval_inputs)
    params = list(built.parameters())
    return Prepared(
        case,
        module,
        model_path,
        calib_path,
        eval_path,
        calibration,
        eval_inputs,
        sum(p.numel() for p in params),
        sum(p.numel() * p.element_size() for p in params),
    )
