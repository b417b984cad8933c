"""What qaas serves: model format × mode × backend, as data. Pure Python: the API and the engine share it.

    SUPPORT["pt2"]["qat"]                       # ("fbgemm", "x86", "auto")
    refusal("hf", "static", "fbgemm")           # "Hugging Face models are served in dynamic mode: ..."
    refusal("pt2", "static", "x86", weight_granularity="per_tensor")   # a sentence naming what works

`SUPPORT` is the product's matrix, derived from the backends' declarations (`qaas.contract.backends`): what
each serves and the option values it refuses. Which backends a given worker can run also depends on its torch
build and tools (each declaration's `needs`: the x86 `.pt2` path needs torchao and a C++ compiler). `auto` is
listed where at least one backend applies: it quantizes with each candidate on the worker's CPU and keeps one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qaas.contract.backends import BY_NAME, CONCRETE, DECLARATIONS, X86_PER_TENSOR
from qaas.contract.vocab import Backend, Format, Mode

__all__ = [
    "BACKENDS",
    "CONCRETE_BACKENDS",
    "FORMATS",
    "MODES",
    "SUPPORT",
    "X86_PER_TENSOR",
    "backends_for",
    "listing",
    "option_refusal",
    "refusal",
]

FORMATS = tuple(str(f) for f in Format)
MODES = tuple(str(m) for m in Mode)
CONCRETE_BACKENDS = CONCRETE
BACKENDS = (*CONCRETE_BACKENDS, str(Backend.AUTO))


def _served(fmt: str, mode: str) -> tuple[str, ...]:
    concrete = tuple(str(d.name) for d in DECLARATIONS if d.serves_cell(fmt, mode))
    return (*concrete, str(Backend.AUTO)) if concrete else ()


# format -> mode -> the backends that serve it ("auto" wherever at least one does), from the declarations.
SUPPORT: dict[str, dict[str, tuple[str, ...]]] = {
    fmt: {mode: _served(fmt, mode) for mode in MODES} for fmt in FORMATS
}

FORMAT_NAMES = {"pt2": "a .pt2 (torch.export)", "torchscript": "a TorchScript", "hf": "a Hugging Face"}
_MODE_REFUSALS = {
    ("torchscript", "qat"): (
        "QAT needs a .pt2 (torch.export) upload: TorchScript graph mode has no QAT; use mode static or "
        "dynamic for this TorchScript model, or upload it as a .pt2 for QAT"
    ),
    ("hf", "static"): (
        "Hugging Face models are served in dynamic mode: static quantization needs a .pt2 (torch.export) "
        "upload; use mode dynamic for this model"
    ),
    ("hf", "qat"): (
        "Hugging Face models are served in dynamic mode: QAT needs a .pt2 (torch.export) upload; use mode "
        "dynamic for this model"
    ),
}


def listing(names: Sequence[str], *, most: int | None = None, none: str = "") -> str:
    """Names for a sentence: "a", "a or b", "a, b or c"; with `most`, the first `most` of them and "and N more"
    ("a, b and 3 more"), for lists that may be long. `none` stands for an empty list.

    Example:
        >>> listing(["dynamic", "static", "qat"]), listing(["x", "y", "z"], most=2)
        ('dynamic, static or qat', 'x, y and 1 more')
    """
    names = list(names)
    if most is not None:
        more = len(names) - most
        return (", ".join(names[:most]) or none) + (f" and {more} more" if more > 0 else "")
    if not names:
        return none
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def backends_for(
    fmt: str, mode: str, *, weight_granularity: str | None = None, quantize_embeddings: bool | None = None
) -> tuple[str, ...]:
    """The concrete backends ("fbgemm", "x86") that serve a format and mode with these options.

    Args:
        weight_granularity: "per_channel" or "per_tensor" (static and QAT); None for the default.
        quantize_embeddings: dynamic mode's option; None for the default (on for Hugging Face, off otherwise).
    """
    listed = SUPPORT.get(fmt, {}).get(mode, ())
    return tuple(
        b
        for b in CONCRETE_BACKENDS
        if b in listed
        and not option_refusal(
            fmt, mode, b, weight_granularity=weight_granularity, quantize_embeddings=quantize_embeddings
        )
    )


def option_refusal(
    fmt: str,
    mode: str,
    backend: str,
    *,
    weight_granularity: str | None = None,
    quantize_embeddings: bool | None = None,
) -> str | None:
    """Why a concrete backend cannot serve a supported cell with these options, or None when it can."""
    options = {"weight_granularity": weight_granularity, "quantize_embeddings": quantize_embeddings}
    return BY_NAME[backend].limit(fmt, mode, **options)


def refusal(
    fmt: str,
    mode: str,
    backend: str,
    *,
    weight_granularity: str | None = None,
    quantize_embeddings: bool | None = None,
) -> str | None:
    """None when the engine serves (format, mode, backend) with these options, else a sentence saying what works.

    Example:
        >>> refusal("torchscript", "qat", "auto")
        'QAT needs a .pt2 (torch.export) upload: TorchScript graph mode has no QAT; ...'
    """
    if fmt not in SUPPORT:
        return f"models of format {fmt!r} are not quantized: upload a .pt2 (torch.export), TorchScript or Hugging Face model"
    if mode not in MODES:
        return f"mode {mode!r} is unknown: use {listing(list(MODES))}"
    if backend not in BACKENDS:
        return f"backend {backend!r} is unknown: use {listing(list(BACKENDS))}"
    listed = SUPPORT[fmt][mode]
    if not listed:
        modes = [m for m in MODES if SUPPORT[fmt][m]]
        default = f"{FORMAT_NAMES[fmt]} model is served in mode {listing(modes)}"
        return _MODE_REFUSALS.get((fmt, mode), default)
    if backend not in listed:
        served = listing(listed)
        return f"backend {backend} does not serve mode {mode} for {FORMAT_NAMES[fmt]} model: use {served}"
    options: dict[str, Any] = {
        "weight_granularity": weight_granularity,
        "quantize_embeddings": quantize_embeddings,
    }
    if backend != "auto":
        return option_refusal(fmt, mode, backend, **options)
    if backends_for(fmt, mode, **options):
        return None
    problems = [option_refusal(fmt, mode, b, **options) for b in CONCRETE_BACKENDS]
    return next(p for p in problems if p)
