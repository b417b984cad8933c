"""What this build can do: format x mode -> backends. The API refuses anything else with 422 before queueing.
The engine (workers/engine) enforces the same matrix; keep the two in step."""

from __future__ import annotations

SUPPORT: dict[str, dict[str, tuple[str, ...]]] = {
    "pt2": {"dynamic": ("auto", "fbgemm"), "static": ("auto", "fbgemm"), "qat": ("auto", "fbgemm")},
    "torchscript": {"dynamic": ("auto", "fbgemm"), "static": ("auto", "fbgemm")},
}


def unsupported_reason(model_format: str, mode: str, backend: str) -> str | None:
    modes = SUPPORT.get(model_format)
    if modes is None:
        return f"models of format {model_format!r} cannot be quantized by this version"
    backends = modes.get(mode)
    if backends is None:
        return f"mode {mode!r} is not available for {model_format} models in this version: use one of {sorted(modes)}"
    if backend not in backends:
        return f"backend {backend!r} is not available for {mode} on {model_format} models: use one of {list(backends)}"
    return None
