"""Inputs for verification and benchmarks, and the comparison of an int8 model with its float original."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from qaas.contract.shapes import LABELS, resolve_tensor_name
from workers.engine.errors import EngineError
from workers.engine.inputs.models import InputSpec

__all__ = ["Batch", "call_model", "dataset_batches", "fidelity", "flat_outputs", "random_batch"]

DYNAMIC_DIM = 8  # the size of a dynamic non-batch dimension in generated inputs
INT_HIGH = 100  # generated integer inputs (token ids, indices) are drawn from 0..99
MAX_VERIFY_SAMPLES = 64
VERIFY_BATCH = 8
SQNR_CAP_DB = 200.0  # an exact match has infinite SQNR, which JSON cannot carry

Batch = dict[str, torch.Tensor]


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch size a model is fixed to (dimension 0 of its first input), or None when it is dynamic."""
    return specs[0].shape[0] if specs and specs[0].shape else None


def random_batch(specs: Sequence[InputSpec], batch: int, seed: int) -> Batch:
    """Deterministic random inputs: dynamic non-batch dims are 8, integer inputs are drawn from 0..99."""
    generator = torch.Generator().manual_seed(seed)
    out: Batch = {}
    for spec in specs:
        shape = [
            batch if i == 0 and d is None else (DYNAMIC_DIM if d is None else d)
            for i, d in enumerate(spec.shape)
        ]
        dtype = getattr(torch, spec.dtype)
        if dtype.is_floating_point:
            out[spec.name] = torch.randn(shape, generator=generator).to(dtype)
        elif dtype == torch.bool:
            out[spec.name] = torch.randint(0, 2, shape, generator=generator).bool()
        else:
            out[spec.name] = torch.randint(0, INT_HIGH, shape, generator=generator, dtype=dtype)
    return out


def dataset_batches(
    specs: Sequence[InputSpec],
    arrays: Mapping[str, np.ndarray],
    *,
    batch_size: int | None = None,
    limit: int = MAX_VERIFY_SAMPLES,
    seed: int | None = None,
    labels: bool = False,
) -> list[Batch]:
    """Up to `limit` samples of a dataset as model batches, by default 64 samples in batches of 8.

    Args:
        batch_size: samples per batch (default 8); a model with a fixed batch size always gets its own, and
            then a last partial batch is dropped.
        limit: the most samples used.
        seed: when given, the samples are shuffled with it first (calibration and training order).
        labels: also put the dataset's "labels" tensor into each batch, under that name (pop it before
            calling the model).
    """
    names = list(arrays)
    columns = {}
    for spec in specs:
        key = resolve_tensor_name(spec.name, len(specs), names)
        if key is None:
            raise EngineError("dataset_mismatch", f"the dataset has no tensor for model input {spec.name!r}")
        columns[spec.name] = torch.from_numpy(np.ascontiguousarray(arrays[key])).to(
            getattr(torch, spec.dtype)
        )
    if labels:
        columns[LABELS] = torch.from_numpy(np.ascontiguousarray(arrays[LABELS]))
    count = len(next(iter(columns.values())))
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)) if seed is not None else None
    total = min(count, limit)
    fixed = fixed_batch(specs)
    size = fixed or batch_size or VERIFY_BATCH
    starts = range(0, total - size + 1, size) if fixed else range(0, total, size)
    if order is None:
        return [{name: col[s : min(s + size, total)] for name, col in columns.items()} for s in starts]
    picks = [order[s : min(s + size, total)] for s in starts]
    return [{name: col[pick] for name, col in columns.items()} for pick in picks]


def call_model(module: Any, batch: Batch, *, by_name: bool) -> Any:
    """Run a model on a batch: by keyword for TorchScript (its forward names), positionally for programs."""
    with torch.no_grad():
        return module(**batch) if by_name else module(*batch.values())


def flat_outputs(output: Any, *, dequantize: bool = False) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, or tuples, lists and dicts of them), in order;
    with `dequantize`, quantized tensors too, dequantized (an eager int8 layer's output)."""
    if isinstance(output, torch.Tensor):
        if dequantize and output.is_quantized:
            return [output.dequantize()]
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in flat_outputs(item, dequantize=dequantize)]
    return []


def fidelity(reference: Sequence[Any], candidate: Sequence[Any]) -> dict[str, float | None]:
    """Compare model outputs batch by batch: {sqnr_db, cosine, max_abs_error, top1_agreement}.

    Cosine is over all outputs flattened together; top1_agreement compares the argmax of the first output
    when it is 2-D with more than one column (class scores), else it is None.

    Raises:
        EngineError: verification_failed when the outputs differ in structure or shape.
    """
    refs, cands, agree, total = [], [], 0, 0
    top1 = True
    for ref_out, cand_out in zip(reference, candidate, strict=True):
        ref_flat, cand_flat = flat_outputs(ref_out), flat_outputs(cand_out)
        shapes = [tuple(t.shape) for t in ref_flat], [tuple(t.shape) for t in cand_flat]
        if shapes[0] != shapes[1]:
            raise EngineError(
                "verification_failed",
                f"the int8 model returns shapes {shapes[1]}, the float model {shapes[0]}",
            )
        if not ref_flat:
            raise EngineError("verification_failed", "the model returns no floating-point tensor to compare")
        refs += [t.detach().double().flatten() for t in ref_flat]
        cands += [t.detach().double().flatten() for t in cand_flat]
        first = ref_flat[0]
        top1 = top1 and first.dim() == 2 and first.shape[1] > 1
        if top1:
            agree += int((first.argmax(1) == cand_flat[0].argmax(1)).sum())
            total += first.shape[0]
    ref, cand = torch.cat(refs), torch.cat(cands)
    error = ref - cand
    noise = float(error.pow(2).sum())
    signal = float(ref.pow(2).sum())
    sqnr = SQNR_CAP_DB if noise == 0 else min(SQNR_CAP_DB, 10 * math.log10(max(signal, 1e-30) / noise))
    norms = float(ref.norm() * cand.norm())
    cosine = 1.0 if norms == 0 and noise == 0 else float(ref @ cand) / max(norms, 1e-30)
    return {
        "sqnr_db": round(sqnr, 3),
        "cosine": round(cosine, 6),
        "max_abs_error": float(error.abs().max()) if error.numel() else 0.0,
        "top1_agreement": round(agree / total, 6) if top1 and total else None,
    }
