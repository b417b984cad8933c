"""A quantization run's state, shared by the modes and the backends: the `Job` and what a backend makes of it.

A mode handler opens a `Job` (pipeline.start_job), the backend it runs on (workers.engine.lowering) converts it
into an `Int8Model`, and `outcome` writes, reloads, verifies and measures that.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qaas.contract.vocab import ROLE_WORDS
from workers.engine.checks.layers import LayerProbe
from workers.engine.checks.verify import Batch, dataset_batches, random_batch
from workers.engine.errors import EngineError
from workers.engine.inputs.data import inspect_dataset, load_dataset
from workers.engine.inputs.models import LoadedModel
from workers.engine.result import ProgressFn

__all__ = ["ROLES", "Int8Model", "Job", "count_layers"]

# Data roles: the manifest's key, and the word for the dataset in messages.
ROLES = ROLE_WORDS  # the word for a role's dataset in messages ("the evaluation data")
HF_TOKENS = 32  # generated Hugging Face inputs (verification without data, benchmarks): tokens per row
MAX_TOKENS = 128  # JSONL text is tokenized to at most this many tokens (or the model's longest sequence)
QUANTIZED_OP = re.compile(r"quantized::(conv|linear|batch_norm|embedding)\w*")
FLOAT_OPS = {
    f"aten::{op}"
    for op in (
        "linear", "conv1d", "conv2d", "conv3d", "_convolution", "conv_transpose1d", "conv_transpose2d",
        "batch_norm", "layer_norm", "group_norm", "embedding", "lstm", "gru", "addmm",
    )
}  # fmt: skip


@dataclasses.dataclass
class Int8Model:
    """What a backend made, before it is written: the int8 model and its layer counts.

    `kind` says what `module` is: "torchscript", an int8 TorchScript module to save as `model.int8.ts`;
    "aoti", the int8 torch.export program to compile into `model.int8.aoti.pt2`.
    `float_same_build` is the float model compiled the same way (TorchScript), for an honest speedup, or
    `make_same_build` makes it on demand (an AOTInductor compile: only for the backend that is kept);
    `reference`, when set, is what the verification gate compares the int8 model with instead of the uploaded
    float model (QAT: the trained fake-quantized model, since training moves the outputs on purpose).
    `layer_probe` measures per-layer SQNR (layers.py) from the eager models the handler kept; None where the
    path cannot (the handler says why in the job's notes).
    """

    module: Any
    quantized: int
    float_layers: int
    float_same_build: Any = None
    reference: Any = None
    kind: str = "torchscript"
    make_same_build: Callable[[], Any] | None = None
    layer_probe: LayerProbe | None = None


@dataclasses.dataclass
class Job:
    """One quantization run: the loaded model, its data files by role, the candidate backends, the notes.

    `backend` is the backend being built (handlers read it while converting); `candidates` are the backends
    to build (one, unless `auto` asked for several), `dropped` the ones `auto` left out, with the reason.
    """

    mode: str
    config: Any
    model_path: Path
    out_dir: Path
    loaded: LoadedModel
    backend: str
    report: ProgressFn
    files: dict[str, Path]
    notes: list[str]
    candidates: list[str] = dataclasses.field(default_factory=list)
    dropped: dict[str, EngineError] = dataclasses.field(default_factory=dict)
    calibration_samples: int = 0
    _arrays: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def format(self) -> str:
        return self.loaded.format

    @property
    def requested(self) -> str:
        return str(self.config.backend)

    @property
    def by_name(self) -> bool:
        """TorchScript is called with keyword inputs; programs and Hugging Face models positionally."""
        return self.loaded.format == "torchscript"

    def arrays(self, role: str) -> dict[str, np.ndarray]:
        """The arrays of the dataset given for a role ("eval", "calibration", "train"), loaded once.

        JSONL text is tokenized by a Hugging Face model's own tokenizer.
        """
        if role not in self._arrays:
            if self.loaded.format == "hf":
                longest = int((self.loaded.info.hf or {}).get("max_length") or MAX_TOKENS)
                self._arrays[role] = load_dataset(
                    self.files[role], tokenizer_dir=self.loaded.directory, max_length=min(MAX_TOKENS, longest)
                )
            else:
                self._arrays[role] = load_dataset(self.files[role])
        return self._arrays[role]

    def has_labels(self, role: str) -> bool:
        return role in self.files and inspect_dataset(self.files[role]).has_labels

    def batches(self, role: str, **options: Any) -> list[Batch]:
        """Model batches of a role's dataset (see verify.dataset_batches for the options)."""
        return dataset_batches(self.loaded.info.inputs, self.arrays(role), **options)

    def random_batch(self, size: int, seed: int) -> Batch:
        """Deterministic generated inputs of a batch size: token ids below the vocabulary size and a padding
        mask for Hugging Face models (verify.random_batch would draw the mask from 0..99), else random_batch."""
        if self.loaded.format == "hf":
            from workers.engine.inputs.hf import hf_example_inputs

            return hf_example_inputs(self.loaded, size, HF_TOKENS, seed=seed, padded=size > 1)
        return random_batch(self.loaded.info.inputs, size, seed=seed)


def count_layers(module: Any) -> tuple[int, int]:
    """(quantized, float) weighted layers of a TorchScript module, read from its inlined graph."""
    kinds = [node.kind() for node in module.inlined_graph.nodes()]
    quantized = sum(1 for k in kinds if QUANTIZED_OP.fullmatch(k) and "pack" not in k)
    return quantized, sum(1 for k in kinds if k in FLOAT_OPS)
