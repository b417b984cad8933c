"""Inspection records inputs (None for dynamic dims), parameters and layers by type."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.conftest import WIDTH
from workers.engine.errors import EngineError
from workers.engine.inputs.io import inspect_model

MLP_PARAMETERS = 2 * (WIDTH * WIDTH + WIDTH) + WIDTH * 10 + 10


def test_pt2_inspection(mlp_pt2: Path) -> None:
    info = inspect_model(mlp_pt2).to_dict()
    assert info == {
        "format": "pt2",
        "inputs": [{"name": "x", "shape": [None, WIDTH], "dtype": "float32"}],
        "parameters": MLP_PARAMETERS,
        "layers": {"Linear": 3, "ReLU": 1},  # torch.relu in forward belongs to no layer
    }


def test_pt2_recurrent_layers(rnn_pt2: Path) -> None:
    info = inspect_model(rnn_pt2)
    assert info.inputs[0].shape == [None, 6, 32]
    assert info.layers == {"GRU": 1, "LSTM": 1, "Linear": 1}


def test_torchscript_inspection_takes_the_given_shapes(mlp_ts: Path) -> None:
    info = inspect_model(mlp_ts, {"x": [None, WIDTH]}).to_dict()
    assert info["format"] == "torchscript"
    assert info["inputs"] == [{"name": "x", "shape": [None, WIDTH], "dtype": "float32"}]
    assert info["parameters"] == MLP_PARAMETERS
    assert info["layers"] == {"Linear": 3, "ReLU": 1}


def test_torchscript_needs_input_shapes(mlp_ts: Path) -> None:
    with pytest.raises(EngineError) as info:
        inspect_model(mlp_ts)
    assert info.value.code == "input_shapes_required"
    assert '"x"' in info.value.message


@pytest.mark.parametrize(
    ("shapes", "words"),
    [
        ({"y": [None, WIDTH]}, "forward takes x"),
        ({"x": [None, -3]}, "positive integers"),
        ({"x": "16"}, "list"),
        ({"x": {"shape": [None, WIDTH], "dtype": "complex128"}}, "dtype"),
    ],
)
def test_torchscript_input_shapes_are_validated(mlp_ts: Path, shapes: dict, words: str) -> None:
    with pytest.raises(EngineError) as info:
        inspect_model(mlp_ts, shapes)
    assert info.value.code == "invalid_input_shapes"
    assert words in info.value.message
