"""torch.ao's quantized engine, a process-wide switch: set it for a block, or bind a loaded module to one.

The engine set when an int8 TorchScript module is loaded and run decides its speed, whichever engine quantized
it (docs/engine-notes.md): a module is loaded under its engine and runs under it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from workers.engine.errors import EngineError

__all__ = ["EngineBoundModule", "set_engine"]


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
