"""What the engine knows of an uploaded model: its inputs, its inspection, and the model loaded to run.

The loaders (io.py for `.pt2` and TorchScript, hf.py for Hugging Face folders) make these; everything above
them reads them. Kept apart from the loaders so that neither loader imports the other's module for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["InputSpec", "LoadedModel", "ModelInfo"]


@dataclass
class InputSpec:
    """One model input: None in `shape` marks a dynamic dimension; dtype is a torch name like "float32"."""

    name: str
    shape: list[int | None]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """{"name", "shape", "dtype"}."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class ModelInfo:
    """What inspection records about a model: its inputs, parameter count and layers by type.

    `hf` describes a Hugging Face model: {"model_type", "architecture", "tokenizer" (bool), "vocab_size",
    "hidden_size", "max_length"}; it is None for other formats.
    """

    format: str
    inputs: list[InputSpec]
    parameters: int
    layers: dict[str, int] = field(default_factory=dict)
    hf: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """{"format", "inputs": [{"name", "shape", "dtype"}], "parameters", "layers"}, and "hf" when set."""
        out = {
            "format": self.format,
            "inputs": [spec.to_dict() for spec in self.inputs],
            "parameters": self.parameters,
            "layers": dict(self.layers),
        }
        return out if self.hf is None else out | {"hf": dict(self.hf)}


@dataclass
class LoadedModel:
    """A model ready to run: `module` is the callable float model in eval mode.

    `program` is the ExportedProgram of a `.pt2` (the dynamic handler rebuilds from it), else None.
    `directory` is the extracted folder of a Hugging Face model (its tokenizer lives there), else None; it
    stays on disk while this object lives (`keep` holds its temporary directory).
    """

    format: str
    module: Any
    info: ModelInfo
    program: Any = None
    directory: Path | None = None
    keep: Any = field(default=None, repr=False)
