"""The fbgemm backend: torch.ao on the fbgemm engine, saved as TorchScript (`model.int8.ts`).

A `.pt2` program is rebuilt into modules (rebuild.py) so that torch.ao's module flows apply: `quantize_dynamic`
(Linear, LSTM, GRU and, when asked, embeddings), FX graph mode for static quantization and QAT (conv+bn+relu
and linear+relu fused, observed or trained, converted), then compiled to TorchScript. TorchScript and Hugging
Face uploads take the flows both engines share (lowering.torchscript).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.ao.quantization import QConfig, QConfigMapping

from qaas.contract.backends import FBGEMM as DECLARATION
from qaas.contract.shapes import LABELS
from workers.engine.checks.layers import ModuleProbe, fused_float, quantized_layers
from workers.engine.errors import EngineError
from workers.engine.exclude import Exclusions
from workers.engine.inputs.rebuild import RebuiltModel, rebuild_modules
from workers.engine.job import Int8Model, Job, count_layers
from workers.engine.lowering.base import NOTHING, NOTHING_HINT, Modes, QATRecipe, StaticRecipe
from workers.engine.lowering.torchscript import (
    WEIGHTED,
    TorchAOLowering,
    default_mapping,
    nothing_quantized,
    script_float,
    to_torchscript,
)

__all__ = ["FBGEMM", "FX_MODES", "FbgemmLowering", "excluded_layers", "qconfig_mapping", "weighted_layers"]


def _freeze_fx(model: Any) -> None:
    model.apply(torch.ao.quantization.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


FX_MODES = Modes(
    train=lambda m: m.train(),
    eval=lambda m: m.eval(),
    freeze=_freeze_fx,
    disable_fake_quant=lambda m: m.apply(torch.ao.quantization.disable_fake_quant),
    enable_fake_quant=lambda m: m.apply(torch.ao.quantization.enable_fake_quant),
)


def qconfig_mapping(qconfig: QConfig, base: QConfigMapping, excluded: list[str]) -> QConfigMapping:
    """torch's default mapping for the engine (`base`) with `qconfig` as the global one, excluded names float.

    The per-type entries that share the default's activation observer (transposed convolutions, layer norm)
    get the job's observer too; fixed-qparams ops (sigmoid, tanh, softmax) keep theirs.
    """
    default = base.global_qconfig
    base.set_global(qconfig)
    for key, entry in list(base.object_type_qconfigs.items()):
        if entry is not None and default is not None and entry.activation is default.activation:
            base.set_object_type(key, QConfig(activation=qconfig.activation, weight=entry.weight))
    for name in excluded:
        base.set_module_name(name, None)
    return base


def excluded_layers(rebuilt: RebuiltModel, job: Job) -> list[str]:
    """The rebuilt module names that config.exclude keeps in float (by path, module name or type name).

    Raises:
        EngineError: nothing_quantized when no layer static quantization converts is left, before any
            calibration or training time is spent.
    """
    excluded = Exclusions(job.config.exclude)
    names = [n for n, (path, kind) in rebuilt.layers.items() if excluded(path, n, type_name=kind)]
    job.notes.extend(excluded.unused_warnings())
    if not any(kind in WEIGHTED for n, (_, kind) in rebuilt.layers.items() if n not in names):
        raise nothing_quantized(job.loaded, any(kind in WEIGHTED for _, kind in rebuilt.layers.values()))
    return names


def weighted_layers(rebuilt: RebuiltModel, converted: Any) -> dict[str, tuple[str, str]]:
    """The rebuilt weighted layers (conv, linear, batch norm) that are int8 modules in `converted`: a fused
    group under its first layer's name (conv+bn+relu is the conv)."""
    candidates = {n: layer for n, layer in rebuilt.layers.items() if layer[1] in WEIGHTED}
    return quantized_layers(converted, candidates)


def dynamic_program(job: Job, config: Any) -> Int8Model:
    """`quantize_dynamic` on the rebuilt modules: Linear, LSTM, GRU and (when asked) Embedding layers."""
    rebuilt = rebuild_modules(job.loaded.program, embeddings=bool(config.quantize_embeddings))
    job.notes.extend(rebuilt.warnings)
    excluded = Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {}
    for name, (path, type_name) in rebuilt.layers.items():
        if not excluded(path, name, type_name=type_name):
            qconfigs[name] = (
                torch.ao.quantization.float_qparams_weight_only_qconfig
                if type_name == "Embedding"
                else torch.ao.quantization.default_dynamic_qconfig
            )
    job.notes.extend(excluded.unused_warnings())
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
    module = to_torchscript(quantized, job.loaded, config.seed, job.notes, freeze=False)
    return Int8Model(module, count, float_layers, script_float(rebuilt.module), layer_probe=probe)


def static_program(job: Job, config: Any, recipe: StaticRecipe) -> Int8Model:
    """FX graph mode on the rebuilt modules: fuse, observe the recipe's calibration, convert, script."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    rebuilt = rebuild_modules(job.loaded.program, static=True)
    job.notes.extend(rebuilt.warnings)
    excluded = excluded_layers(rebuilt, job)
    float_same_build = script_float(rebuilt.module)
    fused = fused_float(rebuilt.module)  # the float side of per-layer SQNR, one module per int8 module
    mapping = qconfig_mapping(recipe.qconfig(job.backend), default_mapping(job.backend), excluded)
    prepared = prepare_fx(rebuilt.module, mapping, recipe.example)
    recipe.calibrate(prepared)
    job.report("converting", 35.0, "converting to int8")
    converted = convert_fx(prepared)
    module = to_torchscript(converted, job.loaded, config.seed, job.notes)
    quantized, float_layers = count_layers(module)
    if not quantized:
        raise nothing_quantized(job.loaded, bool(excluded))
    probe = ModuleProbe(
        fused, converted, weighted_layers(rebuilt, converted), torch.backends.quantized.engine
    )
    return Int8Model(module, quantized, float_layers, float_same_build, layer_probe=probe)


def _trained_float(prepared: Any) -> Any:
    """The trained model in float (a copy with fake quantization off): what per-layer SQNR compares the int8
    layers with, since training moved the weights away from the uploaded ones on purpose."""
    trained = copy.deepcopy(prepared).eval()
    trained.apply(torch.ao.quantization.disable_fake_quant)
    trained.apply(torch.ao.quantization.disable_observer)
    return trained


def qat_program(job: Job, config: Any, recipe: QATRecipe) -> Int8Model:
    """`prepare_qat_fx` on the rebuilt modules (conv+bn fused into QAT modules), trained, converted."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

    rebuilt = rebuild_modules(job.loaded.program, static=True)
    job.notes.extend(rebuilt.warnings)
    excluded = excluded_layers(rebuilt, job)
    float_same_build = script_float(rebuilt.module)
    # Training updates the tensors in place: work on a copy, so that the float reference stays as uploaded.
    model = copy.deepcopy(rebuilt.module).train()
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())
    base = get_default_qat_qconfig_mapping(job.backend)
    mapping = qconfig_mapping(recipe.qconfig(job.backend), base, excluded)
    example = job.batches("train", batch_size=2, limit=2)[0]
    example.pop(LABELS, None)
    prepared = prepare_qat_fx(model, mapping, tuple(example.values()))
    if recipe.initialise is not None:
        with torch.no_grad():
            recipe.initialise(prepared, FX_MODES)
    recipe.train(prepared, FX_MODES)
    job.report("converting", 35.0, "converting the trained model to int8")
    reference = copy.deepcopy(prepared)  # the fake-quantized model the int8 one must match
    converted = convert_fx(prepared)
    module = to_torchscript(converted, job.loaded, config.seed, job.notes)
    quantized, float_layers = count_layers(module)
    if not quantized:
        raise nothing_quantized(job.loaded, bool(excluded))
    layers = weighted_layers(rebuilt, converted)
    probe = ModuleProbe(_trained_float(reference), converted, layers, torch.backends.quantized.engine)
    float_layers += len(rebuilt.float_weights)
    return Int8Model(module, quantized, float_layers, float_same_build, reference, layer_probe=probe)


class FbgemmLowering(TorchAOLowering):
    """torch.ao's module flows on the fbgemm engine, for every format it serves."""

    declaration = DECLARATION
    engine = "fbgemm"
    program_dynamic_layers = "Linear, LSTM and GRU layers"

    dynamic_program = staticmethod(dynamic_program)
    static_program = staticmethod(static_program)
    qat = staticmethod(qat_program)


FBGEMM = FbgemmLowering()
