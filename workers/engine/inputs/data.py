"""Datasets for calibration, training and evaluation, detected by content.

`.npz` and `.safetensors` arrays; image-folder zips (`<class>/<image>`, preprocessed by images.py); JSONL text
(`{"text": ..., "label": ...}` per line) for Hugging Face models, tokenized at job time by the model's own
tokenizer. Inspection reads headers (and every JSONL line), never the arrays themselves.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qaas.contract.shapes import LABELS, check_shapes_match
from workers.engine.errors import EngineError
from workers.engine.inputs.archive import check_zip, open_zip
from workers.engine.inputs.images import image_size as preprocessed_size
from workers.engine.inputs.images import list_image_folder, load_images, parse_preprocess

if TYPE_CHECKING:  # io imports torch; datasets are read without it
    from workers.engine.inputs.models import ModelInfo

__all__ = ["DatasetInfo", "check_dataset_matches", "inspect_dataset", "load_dataset", "tokenize_jsonl"]

UNSUPPORTED = (
    "is not a dataset qaas reads: supported: .npz, .safetensors, an image-folder zip (<class>/<image>.png "
    'or .jpg), JSONL text (one {"text": "...", "label": 0} object per line)'
)
TEXT = "text"
JSONL_EXAMPLE = '{"text": "a sentence", "label": 0}'
MAX_LINE_BYTES = 1024**2
DEFAULT_MAX_LENGTH = 128
MAX_TOKENS = 8192  # the longest max_length accepted when the model's config does not say
# A safetensors header longer than this is not a dataset header: refuse before reading it.
MAX_SAFETENSORS_HEADER = 100 * 1024**2
SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


@dataclass
class DatasetInfo:
    """What inspection records about a dataset: tensors by name ({"shape", "dtype"}), samples, labels.

    format is "npz", "safetensors", "image_folder" or "jsonl"; `classes` (image folders) are the class
    names in label order. JSONL text has a tensor "text" of dtype "str", tokenized at job time.
    """

    format: str
    num_samples: int
    tensors: dict[str, dict]
    has_labels: bool
    classes: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """{"format", "num_samples", "tensors", "has_labels"}, and "classes" for image folders."""
        out = {
            "format": self.format,
            "num_samples": self.num_samples,
            "tensors": {k: dict(v) for k, v in self.tensors.items()},
            "has_labels": self.has_labels,
        }
        return out if self.classes is None else out | {"classes": list(self.classes)}


def _zip_members(path: Path) -> list[str] | None:
    """The files of a zip (after the safety checks), or None when the file is not a zip."""
    zf = open_zip(path)
    if zf is None:
        return None
    with zf:
        return [n for n in check_zip(zf, code="invalid_dataset", what="dataset") if not n.endswith("/")]


def _npz_members(path: Path) -> list[str] | None:
    names = _zip_members(path)
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
    except (ValueError, RecursionError):  # a header nested thousands deep is not a dataset's
        return None
    return header if isinstance(header, dict) else None


def _looks_like_jsonl(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{")


def _detect(path: Path) -> str:
    names = _zip_members(path)
    if names is not None:
        if names and all(n.endswith(".npy") for n in names):
            return "npz"
        with zipfile.ZipFile(path) as zf:
            if list_image_folder(zf, names) is not None:
                return "image_folder"
        raise EngineError("unsupported_format", f"this zip {UNSUPPORTED}")
    if _safetensors_header(path) is not None:
        return "safetensors"
    if _looks_like_jsonl(path):
        return "jsonl"
    raise EngineError("unsupported_format", f"this file {UNSUPPORTED}")


def _jsonl_error(lineno: int, problem: str) -> EngineError:
    return EngineError(
        "invalid_dataset", f"line {lineno} {problem}; write one JSON object per line, e.g. {JSONL_EXAMPLE}"
    )


def _read_jsonl(path: Path) -> tuple[list[str], list[int] | None]:
    """Every line's text, and every line's label (None when no line has one)."""
    texts: list[str] = []
    labels: list[int] = []
    first_line, labelled = 0, False
    lineno = 0
    with path.open("rb") as f:
        while raw := f.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise _jsonl_error(lineno, f"is longer than {MAX_LINE_BYTES} bytes")
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise EngineError("invalid_dataset", f"line {lineno} is not UTF-8 text ({exc})") from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise _jsonl_error(lineno, f"is not valid JSON ({exc})") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get(TEXT), str):
                raise _jsonl_error(lineno, 'has no "text" string')
            label = obj.get("label")
            if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
                raise _jsonl_error(lineno, f"has label {label!r}: labels are class indices 0, 1, 2, …")
            if not texts:
                first_line, labelled = lineno, label is not None
            elif (label is not None) != labelled:
                has, other = ("has a", "has none") if label is not None else ("has no", "has one")
                raise EngineError(
                    "invalid_dataset",
                    f"line {lineno} {has} label but line {first_line} {other}: label every line, or none",
                )
            texts.append(obj[TEXT])
            if label is not None:
                labels.append(label)
    return texts, labels if labelled else None


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


def _inspect_images(path: Path, preprocess: Mapping[str, Any] | None) -> DatasetInfo:
    spec = parse_preprocess(preprocess)
    with zipfile.ZipFile(path) as zf:
        folder = list_image_folder(zf, [n for n in zf.namelist() if not n.endswith("/")])
        if folder is None:  # _detect saw images: only a changed file gets here
            raise EngineError("invalid_dataset", "the zip holds no images")
        height, width = preprocessed_size(zf, folder, spec)
    n = len(folder.entries)
    tensors = {
        "x": {"shape": [n, 3, height, width], "dtype": "float32"},
        LABELS: {"shape": [n], "dtype": "int64"},
    }
    return DatasetInfo("image_folder", n, tensors, True, classes=folder.classes)


def _inspect_jsonl(path: Path) -> DatasetInfo:
    texts, labels = _read_jsonl(path)
    if not texts:
        raise EngineError("invalid_dataset", f"the dataset has 0 samples; write lines like {JSONL_EXAMPLE}")
    n = len(texts)
    tensors: dict[str, dict] = {TEXT: {"shape": [n], "dtype": "str"}}
    if labels is not None:
        tensors[LABELS] = {"shape": [n], "dtype": "int64"}
    return DatasetInfo("jsonl", n, tensors, labels is not None)


def inspect_dataset(path: str | Path, *, preprocess: Mapping[str, Any] | None = None) -> DatasetInfo:
    """Inspect a dataset file without loading its arrays.

    All tensors share dimension 0, the sample count; a tensor named "labels" holds labels. An image-folder
    zip becomes "x" (float32 [N, 3, H, W]) and "labels"; JSONL text becomes "text" (dtype "str").

    Args:
        path: the uploaded file.
        preprocess: for image-folder zips, {"resize", "crop", "mean", "std"} (see images.py); None means
            no resize, crop or normalization (then every image must have the same size).

    Raises:
        EngineError: unsupported_format (none of the formats above), invalid_dataset.

    Example:
        >>> inspect_dataset("calib.npz").to_dict()
        {'format': 'npz', 'num_samples': 256, 'tensors': {'x': {'shape': [256, 16], 'dtype': 'float32'}}, ...}
    """
    path = Path(path)
    fmt = _detect(path)
    if preprocess and fmt != "image_folder":
        raise EngineError(
            "invalid_dataset", f"preprocess applies to image-folder zips; this dataset is {fmt}: omit it"
        )
    if fmt == "image_folder":
        return _inspect_images(path, preprocess)
    if fmt == "jsonl":
        return _inspect_jsonl(path)
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


def load_dataset(
    path: str | Path,
    *,
    preprocess: Mapping[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> dict[str, np.ndarray]:
    """Load every array of a dataset (after the checks of inspect_dataset), by name.

    Args:
        path: the dataset file.
        preprocess: for image-folder zips, as in inspect_dataset.
        tokenizer_dir: for JSONL text, the Hugging Face model folder whose tokenizer turns it into
            input_ids and attention_mask (see tokenize_jsonl); without it JSONL loads as {"text": object
            array of str, "labels"}.
        max_length: for JSONL text with tokenizer_dir, the longest tokenized sequence.

    Raises:
        EngineError: as inspect_dataset and tokenize_jsonl; invalid_dataset when an array cannot be read.
    """
    path = Path(path)
    info = inspect_dataset(path, preprocess=preprocess)
    if info.format == "image_folder":
        with zipfile.ZipFile(path) as zf:
            folder = list_image_folder(zf, [n for n in zf.namelist() if not n.endswith("/")])
            if folder is None:
                raise EngineError("invalid_dataset", "the zip holds no images")
            return load_images(zf, folder, parse_preprocess(preprocess))
    if info.format == "jsonl":
        if tokenizer_dir is not None:
            return tokenize_jsonl(path, tokenizer_dir, max_length)
        texts, labels = _read_jsonl(path)
        text = {TEXT: np.asarray(texts, dtype=object)}
        return text if labels is None else text | {LABELS: np.asarray(labels, np.int64)}
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
    if ds.format == "jsonl":
        if model.format != "hf":
            raise EngineError(
                "dataset_mismatch",
                f"the {role} dataset is JSONL text, which only Hugging Face models take (their tokenizer "
                f"turns it into input_ids); give this {model.format} model .npz or .safetensors arrays named "
                "after its inputs",
            )
        if not (model.hf or {}).get("tokenizer"):
            raise EngineError(
                "dataset_mismatch",
                f"the {role} dataset is JSONL text, but the model came without a tokenizer: upload the model "
                "zip with its tokenizer files, or give .npz arrays input_ids and attention_mask",
            )
        return  # tokenized at job time: every row fits input_ids and attention_mask
    message = check_shapes_match([spec.to_dict() for spec in model.inputs], ds.tensors, role=role)
    if message is not None:
        raise EngineError("dataset_mismatch", message)


def _longest_sequence(directory: Path) -> int:
    from workers.engine.inputs.hf import max_sequence_length

    try:
        return max_sequence_length(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError):
        return MAX_TOKENS  # a tokenizer folder without a usable config: the tokenizer's own limit applies


def tokenize_jsonl(
    path: str | Path, tokenizer_dir: str | Path, max_length: int = DEFAULT_MAX_LENGTH
) -> dict[str, np.ndarray]:
    """Tokenize a JSONL text dataset with a Hugging Face model's own tokenizer, offline.

    Rows are truncated to max_length tokens and padded to the longest row.

    Args:
        path: the JSONL file ({"text": str, "label": int (optional)} per line).
        tokenizer_dir: the extracted model folder (LoadedModel.directory) holding the tokenizer files.
        max_length: the longest sequence, 1 .. the model's position embeddings.

    Returns:
        {"input_ids": int64 [N, L], "attention_mask": int64 [N, L]} and "labels" int64 [N] when labelled.

    Raises:
        EngineError: invalid_dataset (not JSONL, or a bad line), invalid_config (max_length out of range),
            unsupported_combination (no tokenizer in the folder), model_load_failed.

    Example:
        >>> tokenize_jsonl("reviews.jsonl", loaded.directory, 64)["input_ids"].shape
        (500, 64)
    """
    path, tokenizer_dir = Path(path), Path(tokenizer_dir)
    if _detect(path) != "jsonl":
        raise EngineError(
            "invalid_dataset", f"only JSONL text is tokenized; write lines like {JSONL_EXAMPLE}"
        )
    longest = _longest_sequence(tokenizer_dir)
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= longest:
        raise EngineError(
            "invalid_config",
            f"max_length {max_length!r} is out of range: use 1..{longest} (the model's longest sequence)",
        )
    texts, labels = _read_jsonl(path)
    if not texts:
        raise EngineError("invalid_dataset", f"the dataset has 0 samples; write lines like {JSONL_EXAMPLE}")
    from workers.engine.inputs.hf import load_tokenizer  # imports torch and transformers

    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.pad_token is None:
        raise EngineError(
            "unsupported_combination",
            "the model's tokenizer has no padding token, so texts of different lengths cannot be batched",
        )
    encoded = tokenizer(texts, truncation=True, max_length=max_length, padding="longest", return_tensors="np")
    out = {
        "input_ids": np.asarray(encoded["input_ids"], np.int64),
        "attention_mask": np.asarray(encoded["attention_mask"], np.int64),
    }
    return out if labels is None else out | {LABELS: np.asarray(labels, np.int64)}
