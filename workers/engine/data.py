"""Datasets for calibration, training and evaluation: `.npz` and `.safetensors`, detected by content."""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workers.engine.archive import check_zip, open_zip
from workers.engine.errors import EngineError
from workers.engine.shapes import LABELS, check_shapes_match

if TYPE_CHECKING:  # io imports torch; datasets are read without it
    from workers.engine.io import ModelInfo

__all__ = ["DatasetInfo", "check_dataset_matches", "inspect_dataset", "load_dataset"]

UNSUPPORTED = (
    "is not a dataset qaas reads: supported: .npz, .safetensors; image-folder zip and JSONL come later"
)
# A safetensors header longer than this is not a dataset header: refuse before reading it.
MAX_SAFETENSORS_HEADER = 100 * 1024**2
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass
class DatasetInfo:
    """What inspection records about a dataset: tensors by name ({"shape", "dtype"}), samples, labels."""

    format: str
    num_samples: int
    tensors: dict[str, dict]
    has_labels: bool

    def to_dict(self) -> dict[str, Any]:
        """{"format", "num_samples", "tensors", "has_labels"}."""
        return {
            "format": self.format,
            "num_samples": self.num_samples,
            "tensors": {k: dict(v) for k, v in self.tensors.items()},
            "has_labels": self.has_labels,
        }


def _npz_members(path: Path) -> list[str] | None:
    zf = open_zip(path)
    if zf is None:
        return None
    with zf:
        names = [n for n in check_zip(zf, code="invalid_dataset", what="dataset") if not n.endswith("/")]
    if not names or not all(n.endswith(".npy") for n in names):
        return None
    return names


def _safetensors_header(path: Path) -> dict[str, Any] | None:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            return None
        (length,) = struct.unpack("<Q", raw)
        if not 2 <= length <= MAX_SAFETENSORS_HEADER:
            return None
        text = f.read(length)
    if not text.lstrip().startswith(b"{"):
        return None
    try:
        header = json.loads(text)
    except ValueError:
        return None
    return header if isinstance(header, dict) else None


def _detect(path: Path) -> str:
    if _npz_members(path) is not None:
        return "npz"
    if _safetensors_header(path) is not None:
        return "safetensors"
    raise EngineError("unsupported_format", f"this file {UNSUPPORTED}")


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[list[int], np.dtype]:
    with zf.open(member) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise EngineError(
                "invalid_dataset", f"array {member!r} uses .npy format {version}; save it with numpy"
            )
    return list(shape), dtype


def _tensor_table(fmt: str, path: Path) -> dict[str, dict]:
    tensors: dict[str, dict] = {}
    if fmt == "npz":
        with zipfile.ZipFile(path) as zf:
            for member in _npz_members(path) or []:
                shape, dtype = _npy_header(zf, member)
                if dtype.hasobject or dtype.kind not in "biuf":
                    raise EngineError(
                        "invalid_dataset",
                        f"array {member[:-4]!r} holds {dtype} values; save numeric arrays (np.float32, np.int64)",
                    )
                tensors[member[:-4]] = {"shape": shape, "dtype": str(dtype)}
        return tensors
    header = _safetensors_header(path) or {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict) or "shape" not in meta or "dtype" not in meta:
            raise EngineError("invalid_dataset", f"safetensors entry {name!r} has no shape or dtype")
        dtype_name = SAFETENSORS_DTYPES.get(str(meta["dtype"]))
        if dtype_name is None:
            raise EngineError(
                "invalid_dataset",
                f"safetensors entry {name!r} has dtype {meta['dtype']}; use float32 or int64",
            )
        tensors[name] = {"shape": [int(d) for d in meta["shape"]], "dtype": dtype_name}
    return tensors


def inspect_dataset(path: str | Path) -> DatasetInfo:
    """Inspect a dataset file without loading its arrays.

    All tensors share dimension 0, the sample count; a tensor named "labels" holds labels.

    Raises:
        EngineError: unsupported_format (not .npz or .safetensors), invalid_dataset.

    Example:
        >>> inspect_dataset("calib.npz").to_dict()
        {'format': 'npz', 'num_samples': 256, 'tensors': {'x': {'shape': [256, 16], 'dtype': 'float32'}}, ...}
    """
    path = Path(path)
    fmt = _detect(path)
    tensors = _tensor_table(fmt, path)
    if not tensors:
        raise EngineError(
            "invalid_dataset", "the dataset holds no arrays; save one per model input, e.g. x=..."
        )
    firsts = {name: (t["shape"][0] if t["shape"] else None) for name, t in tensors.items()}
    num_samples = next(iter(firsts.values()))
    # a None anywhere is either the first count or makes the counts differ
    if num_samples is None or len(set(firsts.values())) != 1:
        listing = ", ".join(f"{n}: {t['shape']}" for n, t in tensors.items())
        raise EngineError(
            "invalid_dataset",
            f"every array must have the same first dimension (the sample count); found {listing}",
        )
    if num_samples == 0:
        raise EngineError("invalid_dataset", "the dataset has 0 samples")
    return DatasetInfo(fmt, int(num_samples), tensors, LABELS in tensors)


def load_dataset(path: str | Path) -> dict[str, np.ndarray]:
    """Load every array of a dataset (after the checks of inspect_dataset), by name.

    Raises:
        EngineError: as inspect_dataset; invalid_dataset when an array cannot be read.
    """
    path = Path(path)
    info = inspect_dataset(path)
    try:
        if info.format == "npz":
            with np.load(path, allow_pickle=False) as npz:
                return {name: np.asarray(npz[name]) for name in info.tensors}
        from safetensors.numpy import load_file

        return dict(load_file(str(path)))
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(
            "invalid_dataset", f"the dataset could not be read ({type(exc).__name__}: {exc})"
        ) from exc


def check_dataset_matches(model: ModelInfo, ds: DatasetInfo, *, role: str = "dataset") -> None:
    """Raise dataset_mismatch unless `ds` has a tensor of the right shape and dtype for every model input.

    Args:
        model: a ModelInfo.
        ds: the dataset's inspection.
        role: the word for the dataset in messages ("calibration", "evaluation").

    Raises:
        EngineError: dataset_mismatch, e.g. "calibration tensor 'x' has shape [8, 3, 28, 28], the model
            expects [N, 3, 32, 32]".
    """
    message = check_shapes_match([spec.to_dict() for spec in model.inputs], ds.tensors, role=role)
    if message is not None:
        raise EngineError("dataset_mismatch", message)
