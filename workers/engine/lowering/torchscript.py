"""torch.ao's quantized engines to TorchScript: what the fbgemm and x86 backends share.

Both engines run the same torch.ao flows; what changes is the engine set while converting, loading and
running (`Lowering.context`). This module holds the TorchScript artifact (`model.int8.ts`), the script-or-trace
compile, and the flows that do not depend on the backend: TorchScript graph mode for TorchScript uploads
(`quantize_dynamic_jit`, `quantize_jit`) and Hugging Face encoders (hf.quantize_hf_dynamic, traced).
`TorchAOLowering` serves those formats; each backend says how it lowers a `.pt2`.
"""

from __future__ import annotations

import abc
import zipfile
from pathlib import Path
from typing import Any

import torch

from workers.engine.checks.layers import GRAPH_MODE, ModuleProbe, unavailable
from workers.engine.checks.verify import fixed_batch, random_batch
from workers.engine.errors import EngineError
from workers.engine.exclude import Exclusions
from workers.engine.inputs.models import LoadedModel
from workers.engine.job import Int8Model, Job, count_layers
from workers.engine.lowering.base import NOTHING, NOTHING_HINT, Artifact, Lowering, StaticRecipe
from workers.engine.qengine import EngineBoundModule, set_engine
from workers.engine.result import atomic_write

__all__ = [
    "STATIC_LAYERS",
    "TORCHSCRIPT",
    "WEIGHTED",
    "TorchAOLowering",
    "default_mapping",
    "load_torchscript",
    "nothing_quantized",
    "script_float",
    "to_torchscript",
]

STATIC_LAYERS = "Conv1d/2d/3d, Linear and BatchNorm (fused with a following ReLU)"
WEIGHTED = {"Linear", "Conv1d", "Conv2d", "Conv3d", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"}


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


def _save(module: Any, target: Path) -> Path:
    return atomic_write(target, lambda p: torch.jit.save(module, str(p)))


def torchscript_parts(artifact: Path) -> tuple[int, int]:
    weights = code = 0
    # TorchScript: tensors under data/ (a frozen module's under constants/), (compressed) code under code/
    with zipfile.ZipFile(artifact) as zf:
        for info in zf.infolist():
            part = info.filename.split("/")[1] if "/" in info.filename else ""
            weights += info.compress_size if part in ("data", "constants") else 0
            code += info.compress_size if part == "code" else 0
    return weights, code


def _snippet(file: str, engine: str, args: str) -> str:
    return (
        "import torch\n"
        f'torch.backends.quantized.engine = "{engine}"  # the engine it was benchmarked with\n'
        f'model = torch.jit.load("{file}")\n'
        f"y = model({args})\n"
    )


TORCHSCRIPT = Artifact(
    kind="torchscript",
    file="model.int8.ts",
    file_format="torchscript",
    build="TorchScript",
    saving=("saving", 45.0, "writing {file}"),
    save=_save,
    load=lambda path, engine: load_torchscript(path, engine),
    runner=lambda backend: backend,  # the torch.ao quantized engine it was benchmarked with
    parts=torchscript_parts,
    snippet=_snippet,
)


def default_mapping(engine: str) -> Any:
    """torch.ao's default static QConfigMapping for an engine ("x86": per-channel weights)."""
    from torch.ao.quantization import get_default_qconfig_mapping

    return get_default_qconfig_mapping(engine)


def to_torchscript(
    module: Any, loaded: LoadedModel, seed: int, notes: list[str], *, freeze: bool = True
) -> Any:
    """Script a converted module (every dimension stays dynamic), or trace it when scripting fails; freeze it.

    Freezing inlines the quantized modules into one forward with their packed weights as constants: the same
    outputs, a quarter to a third smaller on the test CNNs (the code of each torch.ao module class goes), no
    slower.
    """
    try:
        compiled = torch.jit.script(module)
    except Exception as exc:
        # Tracing is the fallback: outcome.build runs the artifact at batch 1 and 3 to catch a fixed batch.
        notes.append(
            f"the int8 model was traced, not scripted ({type(exc).__name__}); check other input shapes"
        )
        specs = loaded.info.inputs
        example = random_batch(specs, fixed_batch(specs) or 2, seed=seed)
        compiled = torch.jit.trace(module, tuple(example.values()), check_trace=False)
    if not freeze:
        return compiled
    try:
        return torch.jit.freeze(compiled.eval())
    except Exception:
        return compiled  # an unfrozen module is as correct, only bigger


def script_float(module: Any) -> Any:
    """The float model compiled like the int8 one, for the same-build speedup; None when it cannot be."""
    try:
        return torch.jit.script(module)
    except Exception:
        return None  # only a comparison is lost: the benchmark then reports fp32 as uploaded


def nothing_quantized(loaded: LoadedModel, excluded: bool) -> EngineError:
    """The error for a model in which no layer became int8, listing the layer types it has."""
    found = ", ".join(f"{kind} ({count})" for kind, count in loaded.info.layers.items()) or "none"
    why = "every candidate layer is excluded" if excluded else f"static quantization converts {STATIC_LAYERS}"
    return EngineError("nothing_quantized", f"no layer was quantized ({why}); the model's layers: {found}")


def _leaves(module: Any) -> dict[str, Any]:
    return {n: m for n, m in module.named_modules() if n and not any(True for _ in m.children())}


def dynamic_graph_mode(job: Job, config: Any) -> Int8Model:
    """A TorchScript upload's Linear layers, by TorchScript graph mode (`quantize_dynamic_jit`)."""
    module = job.loaded.module
    leaves = _leaves(module)
    excluded = Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {"": torch.ao.quantization.default_dynamic_qconfig}
    for name, sub in leaves.items():
        if excluded(name, type_name=sub.original_name):
            qconfigs[name] = None
    job.notes.extend(excluded.unused_warnings())
    quantized = torch.ao.quantization.quantize_dynamic_jit(module, qconfigs)
    count = sum(1 for node in quantized.inlined_graph.nodes() if node.kind() == "quantized::linear_dynamic")
    weighted = sum(1 for m in leaves.values() if any(True for _ in m.parameters()))
    recurrent = any(m.original_name in ("LSTM", "GRU") for m in leaves.values())
    if count == 0:
        hint = "TorchScript graph mode quantizes Linear only: upload a .pt2 for LSTM and GRU"
        raise EngineError("nothing_quantized", f"{NOTHING}; {hint if recurrent else NOTHING_HINT}")
    if recurrent:
        job.notes.append(
            "LSTM and GRU layers stay float in TorchScript graph mode: upload a .pt2 to quantize them"
        )
    job.notes.append(unavailable(GRAPH_MODE))
    # The uploaded TorchScript is already the same build as the int8 model: it is its own comparison.
    return Int8Model(quantized, count, max(0, weighted - count), module)


def static_graph_mode(job: Job, config: Any, recipe: StaticRecipe) -> Int8Model:
    """A TorchScript upload, observed and converted by TorchScript graph mode (`quantize_jit`)."""
    model = job.loaded.module
    leaves = _leaves(model)
    excluded = Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {"": recipe.qconfig(job.backend)}
    for name, sub in leaves.items():
        if excluded(name, type_name=sub.original_name):
            qconfigs[name] = None
    job.notes.extend(excluded.unused_warnings())

    def calibrate(prepared: Any, _: Any) -> None:
        recipe.calibrate(prepared)

    module = torch.ao.quantization.quantize_jit(model, qconfigs, calibrate, [None])
    job.report("converting", 35.0, "converted to int8 by TorchScript graph mode")
    quantized, float_layers = count_layers(module)
    if not quantized:
        candidates = [n for n, m in leaves.items() if m.original_name in WEIGHTED]
        raise nothing_quantized(job.loaded, bool(candidates) and all(n in qconfigs for n in candidates))
    job.notes.append(unavailable(GRAPH_MODE))
    # The uploaded TorchScript is already the same build as the int8 model: it is its own comparison.
    return Int8Model(module, quantized, float_layers, model)


def hf_dynamic(job: Job, config: Any) -> Int8Model:
    """Every Linear and (by default) the word embeddings, traced to TorchScript on the job's engine."""
    from workers.engine.inputs.hf import quantize_hf_dynamic

    embeddings = True if config.quantize_embeddings is None else config.quantize_embeddings
    made = quantize_hf_dynamic(
        job.loaded, quantize_embeddings=embeddings, exclude=config.exclude, seed=config.seed
    )
    job.notes.extend(made.warnings)
    # HFEncoder holds the transformers model as `model`: its layers are "model.<path>" there.
    layers = {f"model.{path}": (path, type_name) for path, type_name in made.layers.items()}
    probe = None
    if made.eager is not None:
        probe = ModuleProbe(made.float_module, made.eager, layers, torch.backends.quantized.engine)
    return Int8Model(made.module, made.quantized, made.float_layers, made.float_traced, layer_probe=probe)


class TorchAOLowering(Lowering):
    """A backend that runs torch.ao's flows on its quantized engine for TorchScript and Hugging Face uploads;
    subclasses say how a `.pt2` program is lowered (`*_program`) and which layers its dynamic mode takes."""

    program_dynamic_layers = "Linear layers"

    def dynamic_layers(self, fmt: str) -> str:
        if fmt == "hf":
            return "Linear layers and word embeddings"
        return self.program_dynamic_layers if fmt == "pt2" else "Linear layers"

    def dynamic(self, job: Job, config: Any) -> Int8Model:
        if job.format == "hf":
            return hf_dynamic(job, config)
        if job.format == "pt2":
            return self.dynamic_program(job, config)
        return dynamic_graph_mode(job, config)

    def static(self, job: Job, config: Any, recipe: StaticRecipe) -> Int8Model:
        if job.format == "pt2":
            return self.static_program(job, config, recipe)
        return static_graph_mode(job, config, recipe)

    @abc.abstractmethod
    def dynamic_program(self, job: Job, config: Any) -> Int8Model:
        """Dynamic quantization of a `.pt2` program."""

    @abc.abstractmethod
    def static_program(self, job: Job, config: Any, recipe: StaticRecipe) -> Int8Model:
        """Static quantization of a `.pt2` program."""
