"""Dataset tensors against a model's inputs, from stored JSON (no torch, no numpy)."""

from __future__ import annotations

from typing import Any


def _fmt(shape: list[int | None]) -> str:
    return "[" + ", ".join("N" if i == 0 or dim is None else str(dim) for i, dim in enumerate(shape)) + "]"


def shape_mismatch(
    role: str, model_inputs: list[dict[str, Any]], tensors: dict[str, dict[str, Any]]
) -> str | None:
    """The first reason the dataset cannot feed the model, or None. Dimension 0 is the sample dimension."""
    for spec in model_inputs:
        name = spec["name"]
        tensor = tensors.get(name)
        if tensor is None and len(model_inputs) == 1:
            tensor = tensors.get("x")
        if tensor is None:
            have = ", ".join(sorted(tensors)) or "none"
            return f"the {role} dataset has no array named '{name}' for the model input of that name (it has: {have})"
        want, got = spec["shape"], tensor["shape"]
        if len(want) != len(got) or any(
            w is not None and w != g for w, g in zip(want[1:], got[1:], strict=False)
        ):
            return f"{role} tensor '{name}' has shape {list(got)}, the model expects {_fmt(want)}"
    return None
