"""One way to silence the libraries the engine drives while it converts, compiles and traces.

torch.ao warns that it is deprecated on every call, TorchScript compilation warns about torch.ao's annotations,
tracing warns about every data-dependent branch, torchao logs each optional CUDA library it cannot load and
transformers prints progress bars: the report says what matters (docs/engine-notes.md), not these.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

__all__ = ["quiet"]

# Loggers that speak at INFO or WARNING about what the engine does on purpose (torchao, pt2e's pytree).
LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def quiet(loggers: tuple[str, ...] = LOGGERS) -> Iterator[None]:
    """Run a block with the libraries' deprecation, tracer and user warnings off and `loggers` at ERROR."""
    import torch

    chosen = [logging.getLogger(name) for name in loggers]
    levels = [logger.level for logger in chosen]
    for logger in chosen:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=".*deprecat.*")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings(
                "ignore", category=UserWarning, module=r"(torch|torchao|transformers|ast)(\.|$)"
            )
            yield
    finally:
        for logger, level in zip(chosen, levels, strict=True):
            logger.setLevel(level)
