"""Dynamic int8 quantization: int8 weights, activations quantized on the fly.

fbgemm on a `.pt2`: the program is rebuilt into modules (see rebuild.py), quantized with `quantize_dynamic`
and compiled to TorchScript. x86 on a `.pt2`: torchao pt2e (Linear layers) compiled by AOTInductor.
TorchScript uploads go through graph mode (`quantize_dynamic_jit`, Linear only) and Hugging Face encoders
through hf.quantize_hf_dynamic, on the fbgemm or x86 engine. Every artifact is verified after a reload from
disk and benchmarked against the float model (backends.run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qaas.contract.jobs import DynamicConfig
from workers.engine import backends
from workers.engine.errors import EngineError
from workers.engine.io import LoadedModel
from workers.engine.layers import GRAPH_MODE, ModuleProbe, ProgramProbe, quantized_layers, unavailable
from workers.engine.pipeline import Exclusions, Int8Model, Job, check_request, quiet, start_job
from workers.engine.rebuild import rebuild_modules
from workers.engine.result import ProgressFn, QuantResult
from workers.engine.verify import fixed_batch, random_batch
from workers.engine.x86 import quantize_pt2e
from workers.engine.x86_pt2 import aoti_model, example_inputs

__all__ = ["quantize_dynamic_model"]

NOTHING = "no Linear, LSTM or GRU layer found to quantize dynamically"
NOTHING_HINT = "convolutional models need static quantization (mode static)"


def _convert_program(loaded: LoadedModel, config: DynamicConfig, notes: list[str]) -> Int8Model:
    rebuilt = rebuild_modules(loaded.program, embeddings=bool(config.quantize_embeddings))
    notes += rebuilt.warnings
    excluded = Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {}
    for name, (path, type_name) in rebuilt.layers.items():
        if not excluded(path, name, type_name=type_name):
            qconfigs[name] = (
                torch.ao.quantization.float_qparams_weight_only_qconfig
                if type_name == "Embedding"
                else torch.ao.quantization.default_dynamic_qconfig
            )
    notes += excluded.unused_warnings()
    if not qconfigs:
        why = " (every candidate is excluded)" if rebuilt.layers else ""
        raise EngineError("nothing_quantized", f"{NOTHING}{why}; {NOTHING_HINT}")
    quantized = torch.ao.quantization.quantize_dynamic(rebuilt.module, qconfigs, dtype=torch.qint8)  # a copy
    count = sum(
        1 for name, m in quantized.named_modules() if name in qconfigs and "quantized" in type(m).__module__
    )
    float_layers = len(rebuilt.layers) - count + len(rebuilt.float_weights)
    probe = ModuleProbe(
        rebuilt.module,
        quantized,
        quantized_layers(quantized, {n: rebuilt.layers[n] for n in qconfigs}),
        torch.backends.quantized.engine,
    )
    try:
        float_same_build = torch.jit.script(rebuilt.module)
    except Exception:
        float_same_build = None  # only a comparison is lost: the benchmark then reports fp32 as uploaded
    try:
        return Int8Model(
            torch.jit.script(quantized), count, float_layers, float_same_build, layer_probe=probe
        )
    except Exception as exc:
        # Scripting keeps every dimension dynamic; tracing is the fallback and is checked at other batch sizes.
        notes.append(
            f"the int8 model was traced, not scripted ({type(exc).__name__}); check other input shapes"
        )
    specs = loaded.info.inputs
    example = random_batch(specs, fixed_batch(specs) or 2, seed=config.seed)
    traced = torch.jit.trace(quantized, tuple(example.values()), check_trace=False)
    return Int8Model(traced, count, float_layers, layer_probe=probe)


def _convert_script(loaded: LoadedModel, config: DynamicConfig, notes: list[str]) -> Int8Model:
    module = loaded.module
    leaves = {n: m for n, m in module.named_modules() if n and not any(True for _ in m.children())}
    excluded = Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {"": torch.ao.quantization.default_dynamic_qconfig}
    for name, sub in leaves.items():
        if excluded(name, type_name=sub.original_name):
            qconfigs[name] = None
    notes += excluded.unused_warnings()
    quantized = torch.ao.quantization.quantize_dynamic_jit(module, qconfigs)
    count = sum(1 for node in quantized.inlined_graph.nodes() if node.kind() == "quantized::linear_dynamic")
    weighted = sum(1 for m in leaves.values() if any(True for _ in m.parameters()))
    if count == 0:
        rnn = any(m.original_name in ("LSTM", "GRU") for m in leaves.values())
        hint = (
            "TorchScript graph mode quantizes Linear only: upload a .pt2 for LSTM and GRU"
            if rnn
            else NOTHING_HINT
        )
        raise EngineError("nothing_quantized", f"{NOTHING}; {hint}")
    if any(m.original_name in ("LSTM", "GRU") for m in leaves.values()):
        notes.append(
            "LSTM and GRU layers stay float in TorchScript graph mode: upload a .pt2 to quantize them"
        )
    notes.append(unavailable(GRAPH_MODE))
    # The uploaded TorchScript is already the same build as the int8 model: it is its own comparison.
    return Int8Model(quantized, count, max(0, weighted - count), loaded.module)


def _convert_x86_program(job: Job, config: DynamicConfig) -> Int8Model:
    """torchao pt2e dynamic quantization of the Linear layers, for AOTInductor."""
    recurrent = sum(job.loaded.info.layers.get(kind, 0) for kind in ("LSTM", "GRU"))
    if recurrent:
        job.notes.append("LSTM and GRU layers stay float on backend x86: backend fbgemm quantizes them")
    try:
        quantized = quantize_pt2e(
            job.loaded.program, mode="dynamic", example_inputs=example_inputs(job), exclude=config.exclude
        )
    except EngineError as exc:
        if exc.code != "nothing_quantized":
            raise
        hint = "backend fbgemm quantizes LSTM and GRU layers" if recurrent else NOTHING_HINT
        raise EngineError("nothing_quantized", f"{exc.message}; {hint}") from exc
    made = aoti_model(job, quantized)
    made.float_layers += recurrent
    made.layer_probe = ProgramProbe(job.loaded.module, quantized.program.module())
    return made


def _convert_hf(job: Job, config: DynamicConfig) -> Int8Model:
    """Every Linear and (by default) the word embeddings, traced to TorchScript on the job's engine."""
    from workers.engine.hf import quantize_hf_dynamic

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


def _convert(job: Job, config: DynamicConfig, backend: str) -> Int8Model:
    if job.format == "hf":
        what = "Linear layers and word embeddings"
    elif job.format == "pt2" and backend == "fbgemm":
        what = "Linear, LSTM and GRU layers"
    else:
        what = "Linear layers"
    job.report("converting", 15.0, f"quantizing {what} to int8")
    with quiet():
        if job.format == "hf":
            return _convert_hf(job, config)
        if job.format == "pt2":
            if backend == "x86":
                return _convert_x86_program(job, config)
            return _convert_program(job.loaded, config, job.notes)
        return _convert_script(job.loaded, config, job.notes)


def quantize_dynamic_model(
    model_path: str | Path,
    config: DynamicConfig,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    calibration: Any = None,
    eval_data: Any = None,
    train: Any = None,
    progress: ProgressFn | None = None,
) -> QuantResult:
    """Quantize a model dynamically, verify the reloaded artifact, benchmark it; see api.quantize.

    Raises:
        EngineError: unsupported_combination (support.refusal), nothing_quantized, the pipeline's codes.
    """
    fmt = check_request("dynamic", model_path, config)
    data = {"eval": eval_data, "calibration": calibration, "train": train}
    job = start_job(
        "dynamic",
        model_path,
        config,
        out_dir=out_dir,
        input_shapes=input_shapes,
        data=data,
        progress=progress,
        fmt=fmt,
    )
    return backends.run(job, lambda backend: _convert(job, config, backend))
