"""Whether a dataset's tensors fit a model's inputs: plain dicts in, a message out.

Pure Python on purpose: the API validates a job against the JSON it stored at inspection time with this
same rule that the engine applies to the arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_shapes_match", "format_model_shape", "resolve_tensor_name"]

LABELS = "labels"
SINGLE_INPUT_ALIAS = "x"


def format_model_shape(shape: Sequence[int | None]) -> str:
    """Render a model input shape for people: the sample dimension as N, other dynamic ones as ?.

    Example:
        >>> format_model_shape([None, 3, 32, 32])
        '[N, 3, 32, 32]'
    """
    parts = ["N" if i == 0 else ("?" if d is None else str(d)) for i, d in enumerate(shape)]
    return "[" + ", ".join(parts) + "]"


def resolve_tensor_name(input_name: str, n_inputs: int, tensor_names: Sequence[str]) -> str | None:
    """The dataset tensor that feeds model input `input_name`, or None when there is none.

    A single-input model may take its array under its own name or under "x".
    """
    if input_name in tensor_names:
        return input_name
    if n_inputs == 1 and SINGLE_INPUT_ALIAS in tensor_names:
        return SINGLE_INPUT_ALIAS
    return None


def _dtype_kind(dtype: str) -> str:
    if dtype.startswith(("float", "bfloat", "half")):
        return "float"
    if dtype.startswith(("int", "uint", "long")):
        return "integer"
    if dtype == "bool":
        return "bool"
    return dtype


def check_shapes_match(
    model_inputs: Sequence[Mapping[str, Any]],
    tensors: Mapping[str, Mapping[str, Any]],
    *,
    role: str = "dataset",
) -> str | None:
    """Check that every model input has a dataset tensor of a compatible shape and dtype.

    Dimension 0 of a dataset tensor counts samples and is never compared; the other dimensions must equal the
    model's wherever the model's are fixed (None marks a dynamic dimension). Integer and floating tensors do
    not mix; widths within a kind do (float64 calibration data is cast to float32).

    Args:
        model_inputs: [{"name", "shape", "dtype"}], as in a model inspection.
        tensors: {name: {"shape", "dtype"}}, as in a dataset inspection.
        role: the word for the dataset in messages: "calibration", "evaluation", "training".

    Returns:
        None when the dataset fits, else one message that names the problem and the fix.

    Example:
        >>> check_shapes_match([{"name": "x", "shape": [None, 3, 32, 32], "dtype": "float32"}],
        ...                    {"x": {"shape": [8, 3, 28, 28], "dtype": "float32"}}, role="calibration")
        "calibration tensor 'x' has shape [8, 3, 28, 28], the model expects [N, 3, 32, 32]"
    """
    names = [n for n in tensors if n != LABELS]
    for spec in model_inputs:
        name = str(spec["name"])
        key = resolve_tensor_name(name, len(model_inputs), names)
        if key is None:
            found = ", ".join(sorted(tensors)) or "nothing"
            alias = " (or 'x')" if len(model_inputs) == 1 else ""
            return (
                f"the {role} dataset has no tensor for model input '{name}' (it has: {found}); "
                f"name the array '{name}'{alias}"
            )
        shape = list(tensors[key]["shape"])
        expected = list(spec["shape"])
        fits = len(shape) == len(expected) and all(
            want is None or got == want for got, want in zip(shape[1:], expected[1:], strict=True)
        )
        if not fits:
            return (
                f"{role} tensor '{key}' has shape {shape}, the model expects {format_model_shape(expected)}"
            )
        got_kind, want_kind = _dtype_kind(str(tensors[key]["dtype"])), _dtype_kind(str(spec["dtype"]))
        if got_kind != want_kind:
            return (
                f"{role} tensor '{key}' holds {tensors[key]['dtype']} values, the model expects "
                f"{spec['dtype']}; save it as {spec['dtype']}"
            )
    return None
