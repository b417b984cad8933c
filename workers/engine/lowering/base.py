"""What a backend is to the engine: a `Lowering`, built on its contract declaration (qaas.contract.backends).

A mode handler (dynamic.py, static.py, qat.py) keeps the mode's own logic: which observers, the calibration
batches, the training loop. It hands them to the job's backend as a recipe, and the backend prepares, converts
and lowers the model its way into an `Int8Model`; the backend's `Artifact` then saves and loads it.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qaas.contract.backends import BackendDeclaration
from workers.engine.cpu import unmet_need
from workers.engine.errors import EngineError
from workers.engine.job import Int8Model, Job
from workers.engine.qengine import set_engine

__all__ = ["NOTHING", "NOTHING_HINT", "Artifact", "Lowering", "Modes", "QATRecipe", "StaticRecipe"]

NOTHING = "no Linear, LSTM or GRU layer found to quantize dynamically"
NOTHING_HINT = "convolutional models need static quantization (mode static)"


@dataclasses.dataclass(frozen=True)
class Artifact:
    """A kind of int8 artifact: its file name, how it is written and loaded, what runs it.

    `kind` is `Int8Model.kind`; `file_format` the ArtifactFile kind; `build` names the build in messages
    ("fp32 compiled the same way (TorchScript)"); `runner(backend)` is what runs it, for the report;
    `saving` is the progress report while it is written (stage, percent, message with {file});
    `parts(path)` splits a file into (weight bytes, code bytes); `snippet(file, runner, args)` is the Python
    that loads and calls it, for the result; `compiled_for_cpu` says that it holds machine code for the CPU
    that made it (the manifest then records that CPU).
    """

    kind: str
    file: str
    file_format: str
    build: str
    saving: tuple[str, float, str]
    save: Callable[[Any, Path], Path]
    load: Callable[[Path, str], Any]
    runner: Callable[[str], str]
    parts: Callable[[Path], tuple[int, int]]
    snippet: Callable[[str, str, str], str]
    compiled_for_cpu: bool = False


@dataclasses.dataclass(frozen=True)
class Modes:
    """How to switch a prepared QAT model between training and evaluation, and freeze it part of the way."""

    train: Callable[[Any], Any]
    eval: Callable[[Any], Any]
    freeze: Callable[[Any], Any]
    disable_fake_quant: Callable[[Any], Any]
    enable_fake_quant: Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class StaticRecipe:
    """Static mode's part: torch.ao's QConfig for a quantized engine, the calibration pass over a prepared
    model (the same batches for every backend) and an example input (the first calibration batch)."""

    qconfig: Callable[[str], Any]
    calibrate: Callable[[Any], None]
    example: tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class QATRecipe:
    """QAT's part: the fake-quantization QConfig for an engine, the observers' first look at calibration data
    (None without a calibration set) and the training loop, each given the backend's `Modes`."""

    qconfig: Callable[[str], Any]
    initialise: Callable[[Any, Modes], None] | None
    train: Callable[[Any, Modes], None]


class Lowering(abc.ABC):
    """One concrete backend: whether this host runs it, the context it converts in, its conversions in each
    mode, its artifacts and which of its errors `auto` records and goes on from.

    Subclasses implement `dynamic_layers`, `dynamic`, `static` and `qat`; `engine` is the torch.ao quantized engine
    that is set while converting and loading.
    """

    declaration: BackendDeclaration
    engine: str

    @property
    def name(self) -> str:
        return str(self.declaration.name)

    def unavailable(self, fmt: str) -> EngineError | None:
        """Why this worker cannot run the backend for a model format (its declared needs), or None."""
        need = self.declaration.need(fmt)
        if need is None or unmet_need(need) is None:
            return None
        return EngineError("unsupported_combination", f"{need.why} on the worker: use backend fbgemm or auto")

    def require(self, fmt: str) -> None:
        """Raise `unavailable(fmt)` when there is one."""
        problem = self.unavailable(fmt)
        if problem is not None:
            raise problem

    def context(self) -> contextlib.AbstractContextManager[Any]:
        """What a conversion, a load and a run of this backend's TorchScript need set: its quantized engine."""
        return set_engine(self.engine)

    def recoverable(self, exc: EngineError) -> bool:
        """Whether an error is about this backend, not the request: `auto` records it and goes on."""
        return exc.code in self.declaration.recoverable

    def failure(self, job: Job, exc: Exception) -> EngineError | None:
        """An unexpected exception of the backend's own tools as an EngineError, or None: a qaas bug."""
        return None

    @abc.abstractmethod
    def dynamic_layers(self, fmt: str) -> str:
        """The layers dynamic mode quantizes for a model format, for the progress message."""

    @abc.abstractmethod
    def dynamic(self, job: Job, config: Any) -> Int8Model:
        """Dynamic quantization of the job's model (int8 weights, activations quantized per batch)."""

    @abc.abstractmethod
    def static(self, job: Job, config: Any, recipe: StaticRecipe) -> Int8Model:
        """Static quantization: prepare with the recipe's observers, calibrate, convert."""

    @abc.abstractmethod
    def qat(self, job: Job, config: Any, recipe: QATRecipe) -> Int8Model:
        """QAT: prepare fake quantization, run the recipe's training, convert."""
