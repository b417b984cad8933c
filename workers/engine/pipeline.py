"""What every quantization mode shares before the backends run: the request check, the Job, the model's result.

A handler checks its request against the support matrix (`check_request`), opens a `Job` (model loaded, data
files checked against its inputs, candidate backends resolved), and hands `backends.run` a function that makes
an `Int8Model` for a backend; `outcome` writes, reloads, verifies and measures it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from qaas.contract.support import CONCRETE_BACKENDS, SUPPORT, backends_for, option_refusal, refusal
from workers.engine.archive import detect_model_format
from workers.engine.cpu import supported_backends
from workers.engine.data import check_dataset_matches, inspect_dataset, load_dataset
from workers.engine.errors import EngineError
from workers.engine.io import LoadedModel, load_model
from workers.engine.layers import LayerProbe
from workers.engine.result import ProgressFn
from workers.engine.verify import Batch, dataset_batches, random_batch

__all__ = [
    "Exclusions",
    "Int8Model",
    "Job",
    "check_request",
    "count_layers",
    "quiet",
    "start_job",
]

# Data roles: the manifest's key, and the word for the dataset in messages.
ROLES = {"eval": "evaluation", "calibration": "calibration", "train": "training"}
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


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call: say it once, in ENGINE_NOTES, not here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecat.*")
        # TorchScript compilation of torch.ao's modules warns about their annotations and .grad reads.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|ast)(\.|$)")
        yield


class Exclusions:
    """Matches layers against config.exclude (a layer path, its module name, a path prefix or a type name)."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.entries = entries
        self.used: set[str] = set()

    def __call__(self, *names: str, type_name: str) -> bool:
        for entry in self.entries:
            if entry == type_name or any(n and (n == entry or n.startswith(entry + ".")) for n in names):
                self.used.add(entry)
                return True
        return False

    def unused_warnings(self) -> list[str]:
        return [f"exclude entry '{e}' matched no layer" for e in self.entries if e not in self.used]


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
            from workers.engine.hf import hf_example_inputs

            return hf_example_inputs(self.loaded, size, HF_TOKENS, seed=seed, padded=size > 1)
        return random_batch(self.loaded.info.inputs, size, seed=seed)


def _options(config: Any) -> dict[str, Any]:
    return {
        "weight_granularity": getattr(config, "weight_granularity", None),
        "quantize_embeddings": getattr(config, "quantize_embeddings", None),
    }


def check_request(mode: str, model_path: str | Path, config: Any) -> str:
    """The model's format, once the support matrix serves (format, mode, backend) with the config's options.

    Raises:
        EngineError: unsupported_combination with a sentence naming what works; any detection code.
    """
    fmt = detect_model_format(model_path)
    problem = refusal(fmt, mode, config.backend, **_options(config))
    if problem is not None:
        raise EngineError("unsupported_combination", problem)
    return fmt


def _unavailable(backend: str, fmt: str) -> EngineError:
    if backend == "x86" and fmt == "pt2":
        why = "the x86 backend compiles .pt2 models with AOTInductor, which needs torchao and a C++ compiler"
    else:
        why = f"this worker's torch has no {backend} quantized engine (x86-64 CPUs only)"
    return EngineError("unsupported_combination", f"{why} on the worker: use backend fbgemm or auto")


def resolve_candidates(fmt: str, mode: str, config: Any) -> tuple[list[str], dict[str, EngineError]]:
    """The backends to build on this worker, and (auto) the ones left out with the reason.

    Raises:
        EngineError: unsupported_combination when the asked backend (or, for auto, every backend) cannot run.
    """
    available = supported_backends(fmt)
    if config.backend != "auto":
        if config.backend not in available:
            raise _unavailable(config.backend, fmt)
        return [config.backend], {}
    dropped: dict[str, EngineError] = {}
    for backend in CONCRETE_BACKENDS:
        if backend not in SUPPORT[fmt][mode]:
            continue
        problem = option_refusal(fmt, mode, backend, **_options(config))
        if problem is not None:
            dropped[backend] = EngineError("unsupported_combination", problem)
        elif backend not in available:
            dropped[backend] = _unavailable(backend, fmt)
    candidates = [b for b in backends_for(fmt, mode, **_options(config)) if b in available]
    if not candidates:
        raise next(iter(dropped.values()))
    return candidates, dropped


def start_job(
    mode: str,
    model_path: str | Path,
    config: Any,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    data: dict[str, Any],
    progress: ProgressFn | None = None,
    fmt: str | None = None,
) -> Job:
    """Check the request, resolve the candidate backends, load the model, check every dataset against it.

    Args:
        data: dataset paths by role ("eval", "calibration", "train"); None values are ignored.
        fmt: the format check_request returned (checked again when None).

    Raises:
        EngineError: unsupported_combination, any load_model code, dataset_mismatch.
    """
    report = progress or (lambda stage, percent, message: None)
    fmt = fmt or check_request(mode, model_path, config)
    candidates, dropped = resolve_candidates(fmt, mode, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report("loading", 0.0, "loading the model")
    loaded = load_model(Path(model_path), input_shapes)
    files = {role: Path(path) for role, path in data.items() if path is not None}
    for role, path in files.items():
        check_dataset_matches(loaded.info, inspect_dataset(path), role=ROLES[role])
    job = Job(mode, config, Path(model_path), out, loaded, candidates[0], report, files, [])
    job.candidates, job.dropped = candidates, dropped
    return job


def count_layers(module: Any) -> tuple[int, int]:
    """(quantized, float) weighted layers of a TorchScript module, read from its inlined graph."""
    kinds = [node.kind() for node in module.inlined_graph.nodes()]
    quantized = sum(1 for k in kinds if QUANTIZED_OP.fullmatch(k) and "pack" not in k)
    return quantized, sum(1 for k in kinds if k in FLOAT_OPS)
