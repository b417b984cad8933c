"""The x86 backend for TorchScript output: torch.ao's `x86` quantized engine.

The torch.ao flows (FX, eager, TorchScript graph mode) are the same as on fbgemm; what changes is the engine
set while quantizing and while running. The engine set when a TorchScript file is loaded and run decides its
speed, whichever engine quantized it (ENGINE_NOTES.md), so the loaded model is bound to its engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from workers.engine.errors import EngineError

__all__ = ["EngineBoundModule", "load_torchscript", "qconfig_mapping", "set_engine"]


@contextlib.contextmanager
def set_engine(name: str) -> Iterator[str]:
    """Run a block with `torch.backends.quantized.engine` set to `name`, then restore the previous one.

    Raises:
        EngineError: unsupported_combination when this torch build lacks the engine.

    Example:
        >>> with set_engine("x86"):
        ...     model = torch.ao.quantization.quantize_fx.convert_fx(prepared)
    """
    supported = torch.backends.quantized.supported_engines
    if name not in supported:
        raise EngineError(
            "unsupported_combination",
            f"this worker's torch has no {name!r} quantized engine (it has {', '.join(supported)})",
        )
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield name
    finally:
        torch.backends.quantized.engine = previous


def qconfig_mapping(engine: str) -> Any:
    """torch.ao's default static QConfigMapping for an engine ("x86": per-channel weights)."""
    from torch.ao.quantization import get_default_qconfig_mapping

    return get_default_qconfig_mapping(engine)


class EngineBoundModule:
    """A TorchScript module that runs under the quantized engine it was loaded with.

    Each call makes sure that engine is set (a global switch, restored afterwards) so that two candidates
    loaded with different engines can be timed interleaved in one process, as `auto` does. The switch costs
    about 0.1 µs (torch's internal engine id): on a 20 µs model, the public setter's checks cost 15 %.
    """

    def __init__(self, module: torch.jit.ScriptModule, engine: str) -> None:
        self.module = module
        self.engine = engine
        with set_engine(engine):
            self._engine_id = torch._C._get_qengine()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        previous = torch._C._get_qengine()
        if previous == self._engine_id:
            return self.module(*args, **kwargs)
        torch._C._set_qengine(self._engine_id)
        try:
            return self.module(*args, **kwargs)
        finally:
            torch._C._set_qengine(previous)


def load_torchscript(path: str | Path, engine: str) -> EngineBoundModule:
    """Load an int8 TorchScript file under `engine` ("x86" or "fbgemm"), bound to it for every call.

    Loading re-packs the int8 weights for the engine set at that moment, so the engine is set for the load
    too. The snippet users get must do the same: set `torch.backends.quantized.engine`, then `torch.jit.load`.

    Example:
        >>> model = load_torchscript("model.int8.ts", "x86"); y = model(x=batch)
    """
    with set_engine(engine):
        module = torch.jit.load(str(path), map_location="cpu")
    return EngineBoundModule(module.eval(), engine)
