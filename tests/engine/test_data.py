"""Datasets: .npz and .safetensors by content, one sample count, labels, and shape checks against models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from qaas.contract.shapes import check_shapes_match
from workers.engine.errors import EngineError
from workers.engine.inputs.data import check_dataset_matches, inspect_dataset, load_dataset
from workers.engine.inputs.io import InputSpec, ModelInfo

IMAGE_MODEL = [{"name": "x", "shape": [None, 3, 32, 32], "dtype": "float32"}]


def test_npz_inspection(tmp_path: Path) -> None:
    path = tmp_path / "calib.bin"  # the name says nothing: the content does
    with path.open("wb") as f:
        np.savez(f, x=np.zeros((8, 16), np.float32), labels=np.arange(8))
    info = inspect_dataset(path).to_dict()
    assert info == {
        "format": "npz",
        "num_samples": 8,
        "tensors": {"x": {"shape": [8, 16], "dtype": "float32"}, "labels": {"shape": [8], "dtype": "int64"}},
        "has_labels": True,
    }


def test_safetensors_inspection_and_load(tmp_path: Path) -> None:
    path = tmp_path / "calib.safetensors"
    save_file({"x": np.ones((5, 3, 4), np.float32), "ids": np.zeros((5, 7), np.int32)}, str(path))
    info = inspect_dataset(path)
    assert info.format == "safetensors"
    assert info.num_samples == 5
    assert info.tensors["ids"] == {"shape": [5, 7], "dtype": "int32"}
    assert not info.has_labels
    arrays = load_dataset(path)
    assert arrays["x"].shape == (5, 3, 4)


def test_sample_counts_must_agree(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((8, 16), np.float32), labels=np.arange(7))
    with pytest.raises(EngineError) as info:
        inspect_dataset(path)
    assert info.value.code == "invalid_dataset"
    assert "x: [8, 16], labels: [7]" in info.value.message


def test_object_arrays_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(EngineError) as info:
        inspect_dataset(path)
    assert info.value.code == "invalid_dataset"


@pytest.mark.parametrize("content", [b"\x00" * 64, b"hello world\n"])
def test_other_files_are_unsupported(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(EngineError) as info:
        inspect_dataset(path)
    assert info.value.code == "unsupported_format"
    assert "supported: .npz, .safetensors" in info.value.message


def test_check_shapes_match_names_the_problem() -> None:
    tensors = {"x": {"shape": [8, 3, 28, 28], "dtype": "float32"}}
    assert check_shapes_match(IMAGE_MODEL, tensors, role="calibration") == (
        "calibration tensor 'x' has shape [8, 3, 28, 28], the model expects [N, 3, 32, 32]"
    )
    assert check_shapes_match(IMAGE_MODEL, {"x": {"shape": [8, 3, 32, 32], "dtype": "float64"}}) is None


def test_check_shapes_match_aliases_and_dynamic_dims() -> None:
    text = [{"name": "ids", "shape": [None, None], "dtype": "int64"}]
    assert check_shapes_match(text, {"ids": {"shape": [4, 77], "dtype": "int32"}}) is None
    assert (
        check_shapes_match(text, {"x": {"shape": [4, 77], "dtype": "int64"}}) is None
    )  # a single input may be x
    assert "holds float32 values" in (
        check_shapes_match(text, {"ids": {"shape": [4, 7], "dtype": "float32"}}) or ""
    )
    two = text + [{"name": "mask", "shape": [None, None], "dtype": "int64"}]
    missing = check_shapes_match(two, {"x": {"shape": [4, 7], "dtype": "int64"}, "labels": {"shape": [4]}})
    assert missing is not None and "no tensor for model input 'ids'" in missing
    rank = check_shapes_match(IMAGE_MODEL, {"x": {"shape": [8, 3072], "dtype": "float32"}})
    assert rank == "dataset tensor 'x' has shape [8, 3072], the model expects [N, 3, 32, 32]"


def test_check_dataset_matches_raises_dataset_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((8, 3, 28, 28), np.float32))
    model = ModelInfo("pt2", [InputSpec("x", [None, 3, 32, 32], "float32")], 0, {})
    with pytest.raises(EngineError) as info:
        check_dataset_matches(model, inspect_dataset(path), role="calibration")
    assert info.value.code == "dataset_mismatch"
    assert "[N, 3, 32, 32]" in info.value.message


def test_shapes_module_needs_neither_torch_nor_numpy() -> None:
    code = "import sys, qaas.contract.shapes; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
