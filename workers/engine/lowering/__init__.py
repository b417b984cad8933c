"""The backends the engine runs, one `Lowering` each, registered by their contract name.

    backend = lowering.get("x86")
    with backend.context():
        made = backend.static(job, config, recipe)      # an Int8Model
    path = lowering.ARTIFACTS[made.kind].save(made.module, folder / lowering.ARTIFACTS[made.kind].file)

What each backend serves and needs is declared in qaas.contract.backends; this registry holds the code that
converts, saves and loads. Adding a backend (docs/adding-a-backend.md): a declaration there, a module here
(fbgemm.py, the x86/ package), one entry in `REGISTRY`.
"""

from __future__ import annotations

from qaas.contract.backends import ARTIFACT_FILES, CONCRETE
from workers.engine.errors import EngineError
from workers.engine.lowering.base import Artifact, Lowering, Modes, QATRecipe, StaticRecipe
from workers.engine.lowering.fbgemm import FBGEMM
from workers.engine.lowering.torchscript import TORCHSCRIPT
from workers.engine.lowering.x86 import X86
from workers.engine.lowering.x86.aoti import AOTI

__all__ = [
    "ARTIFACTS",
    "REGISTRY",
    "Artifact",
    "Lowering",
    "Modes",
    "QATRecipe",
    "StaticRecipe",
    "artifact_for_file",
    "available",
    "get",
]

# In the declarations' order (qaas.contract.backends.DECLARATIONS): auto builds its candidates in this order.
REGISTRY: dict[str, Lowering] = {
    b.name: b for b in sorted((FBGEMM, X86), key=lambda b: CONCRETE.index(b.name))
}
if tuple(REGISTRY) != CONCRETE:  # a declaration without its module, or a module without its declaration
    raise RuntimeError(f"the engine's backends {tuple(REGISTRY)} are not the contract's {CONCRETE}")
ARTIFACTS: dict[str, Artifact] = {a.kind: a for a in (TORCHSCRIPT, AOTI)}
if {a.file: a.file_format for a in ARTIFACTS.values()} != dict(ARTIFACT_FILES):  # the worker takes only those
    raise RuntimeError(f"the engine's artifact files are not the contract's {dict(ARTIFACT_FILES)}")


def get(name: str) -> Lowering:
    """The backend of a concrete name ("fbgemm", "x86").

    Raises:
        EngineError: unsupported_combination for a name no backend has.
    """
    backend = REGISTRY.get(name)
    if backend is None:
        raise EngineError(
            "unsupported_combination", f"backend {name!r} is unknown: use {', '.join(REGISTRY)}"
        )
    return backend


def available(fmt: str) -> list[str]:
    """The backends this worker runs for a model format, in preference order."""
    return [name for name, backend in REGISTRY.items() if backend.unavailable(fmt) is None]


def artifact_for_file(name: str) -> Artifact:
    """The artifact kind of a file name ("model.int8.aoti.pt2" is an AOTInductor package)."""
    return next(
        (a for a in ARTIFACTS.values() if name.endswith(a.file.removeprefix("model.int8"))), TORCHSCRIPT
    )
