"""What qaas serves: model format × mode × backend, as data. Pure Python: the API and the engine share it.

    SUPPORT["pt2"]["qat"]                       # ("fbgemm", "x86", "auto")
    refusal("hf", "static", "fbgemm")           # "Hugging Face models are served in dynamic mode: ..."
    refusal("pt2", "static", "x86", weight_granularity="per_tensor")   # a sentence naming what works

`SUPPORT` is the product's matrix; which backends a given worker can run also depends on its torch build and
tools (`cpu.supported_backends`: the x86 `.pt2` path needs torchao and a C++ compiler). `auto` is listed where
at least one backend applies: it quantizes with each candidate on the worker's CPU and keeps one.
"""

from __future__ import annotations

__all__ = [
    "BACKENDS",
    "CONCRETE_BACKENDS",
    "FORMATS",
    "MODES",
    "SUPPORT",
    "X86_PER_TENSOR",
    "backends_for",
    "option_refusal",
    "refusal",
]

FORMATS = ("pt2", "torchscript", "hf")
MODES = ("dynamic", "static", "qat")
CONCRETE_BACKENDS = ("fbgemm", "x86")
BACKENDS = (*CONCRETE_BACKENDS, "auto")
_ALL = BACKENDS

# format -> mode -> the backends that serve it ("auto" wherever at least one does).
SUPPORT: dict[str, dict[str, tuple[str, ...]]] = {
    # fbgemm: torch.ao (FX / quantize_dynamic) to TorchScript; x86: torchao pt2e compiled by AOTInductor.
    "pt2": {"dynamic": _ALL, "static": _ALL, "qat": _ALL},
    # TorchScript graph mode on the fbgemm or x86 engine; it has no QAT.
    "torchscript": {"dynamic": _ALL, "static": _ALL, "qat": ()},
    # transformers encoders: quantize_dynamic on the fbgemm or x86 engine, traced to TorchScript.
    "hf": {"dynamic": _ALL, "static": (), "qat": ()},
}

# Checked on torch 2.13 / torchao 0.18: a per-tensor weight spec quantizes, but Inductor's int8 lowering
# matches dequantize_per_channel weights only, and the package ran every layer in fp32.
X86_PER_TENSOR = (
    "backend x86 quantizes .pt2 weights per channel only: torchao's X86InductorQuantizer has no per-tensor "
    "weights, and Inductor compiles per-tensor int8 weights as fp32 layers; use weight_granularity "
    "per_channel, or backend fbgemm for per-tensor weights"
)
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


def _listing(names: tuple[str, ...] | list[str]) -> str:
    """ "a", "a or b", "a, b or c"."""
    names = list(names)
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
        if b in listed and not _option_problem(fmt, mode, b, weight_granularity, quantize_embeddings)
    )


def _option_problem(
    fmt: str, mode: str, backend: str, weight_granularity: str | None, quantize_embeddings: bool | None
) -> str | None:
    if fmt == "pt2" and backend == "x86" and mode in ("static", "qat") and weight_granularity == "per_tensor":
        return X86_PER_TENSOR
    if fmt == "pt2" and backend == "x86" and mode == "dynamic" and quantize_embeddings:
        return (
            "backend x86 quantizes the Linear layers of a .pt2 dynamically, not its embeddings: use backend "
            "fbgemm for quantize_embeddings, or turn quantize_embeddings off"
        )
    if fmt == "torchscript" and mode == "dynamic" and quantize_embeddings:
        return (
            "quantize_embeddings needs a .pt2 (torch.export) or Hugging Face upload: TorchScript graph mode "
            "quantizes Linear layers only; turn quantize_embeddings off"
        )
    return None


def option_refusal(
    fmt: str,
    mode: str,
    backend: str,
    *,
    weight_granularity: str | None = None,
    quantize_embeddings: bool | None = None,
) -> str | None:
    """Why a concrete backend cannot serve a supported cell with these options, or None when it can."""
    return _option_problem(fmt, mode, backend, weight_granularity, quantize_embeddings)


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
        return f"mode {mode!r} is unknown: use {_listing(list(MODES))}"
    if backend not in BACKENDS:
        return f"backend {backend!r} is unknown: use {_listing(list(BACKENDS))}"
    listed = SUPPORT[fmt][mode]
    if not listed:
        modes = [m for m in MODES if SUPPORT[fmt][m]]
        default = f"{FORMAT_NAMES[fmt]} model is served in mode {_listing(modes)}"
        return _MODE_REFUSALS.get((fmt, mode), default)
    if backend not in listed:
        return f"backend {backend} does not serve mode {mode} for {FORMAT_NAMES[fmt]} model: use {_listing(listed)}"
    if backend != "auto":
        return _option_problem(fmt, mode, backend, weight_granularity, quantize_embeddings)
    if backends_for(
        fmt, mode, weight_granularity=weight_granularity, quantize_embeddings=quantize_embeddings
    ):
        return None
    problems = [
        _option_problem(fmt, mode, b, weight_granularity, quantize_embeddings) for b in CONCRETE_BACKENDS
    ]
    return next(p for p in problems if p)
