"""torchao's pt2e flow for the x86 backend: quantize a `.pt2` program with X86InductorQuantizer.

    quantized = quantize_pt2e(program, mode="static", example_inputs=(x,), calibrate=run_batches)

The q/dq program that `convert_pt2e` returns is slower than fp32 when run eagerly; the speed comes from
Inductor's oneDNN int8 kernels once it is compiled (aoti.py; docs/engine-notes.md, "Fast x86 artifact").
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qaas.contract.backends import X86_PER_TENSOR
from workers.engine.checks.layers import module_path
from workers.engine.checks.verify import fixed_batch
from workers.engine.cpu import cpu_info
from workers.engine.errors import EngineError
from workers.engine.job import Job
from workers.engine.lowering.x86.quantizer import (
    SINGLE_CHANNEL_NOTE,
    make_quantizer,
    quantization_config,
    split_shared_activations,
)
from workers.engine.quiet import quiet

__all__ = [
    "MODES",
    "OBSERVERS",
    "QuantizedProgram",
    "dynamic_shapes_of",
    "example_inputs",
    "freeze_pt2e",
    "layer_report",
    "pt2e_eval",
    "pt2e_train",
    "quantize_pt2e",
    "state_bytes",
    "strip_dead_weights",
]

MODES = ("static", "qat", "dynamic")
OBSERVERS = ("histogram", "minmax", "moving_average")
BATCH_NORMS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default")
WEIGHTED_OPS = {
    "aten.conv1d.default",
    "aten.conv2d.default",
    "aten.conv3d.default",
    "aten.linear.default",
}
DEQUANTIZE_WEIGHT = re.compile(r"quantized_decomposed\.dequantize_per_(channel|tensor)")
NOTHING = "no convolution or linear layer was quantized by the x86 (pt2e) quantizer"


@dataclass
class QuantizedProgram:
    """What `quantize_pt2e` returns: the int8 (q/dq) program and what happened to the layers.

    `quantized` and `float_layers` are module paths ("features.0") of the conv/linear calls; `stripped_bytes`
    is what removing the dead fp32 weights saved; `warnings` are for the report.
    """

    program: torch.export.ExportedProgram
    quantized: list[str]
    float_layers: list[str]
    stripped_bytes: int = 0
    warnings: list[str] = field(default_factory=list)


def dynamic_shapes_of(program: torch.export.ExportedProgram) -> tuple[dict[int, Any] | None, ...]:
    """The `dynamic_shapes` that re-exports a program's module with the same dynamic dimensions.

    One entry per user input (positional): {dim: Dim} for symbolic dimensions, with the program's ranges; a
    dimension shared by several inputs gets the same Dim, and derived ones (2*s0) are Dim.AUTO.
    """
    from torch.export.graph_signature import InputKind
    from torch.utils._sympy.numbers import int_oo

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        value = placeholders[spec.arg.name].meta.get("val")
        entry: dict[int, Any] = {}
        for index, size in enumerate(getattr(value, "shape", ())):
            if not isinstance(size, torch.SymInt):
                continue
            expr = size.node.expr
            if not getattr(expr, "is_Symbol", False):
                entry[index] = torch.export.Dim.AUTO
                continue
            if str(expr) not in dims:
                bounds = program.range_constraints.get(expr)
                low = int(bounds.lower) if bounds is not None else 0
                high = None if bounds is None or bounds.upper == int_oo else int(bounds.upper)
                name = "batch" if index == 0 and not dims else f"dim{len(dims)}"
                dims[str(expr)] = torch.export.Dim(name, min=low, max=high)
            entry[index] = dims[str(expr)]
        shapes.append(entry or None)
    return tuple(shapes)


def layer_report(graph: torch.fx.Graph) -> tuple[list[str], list[str]]:
    """(quantized, float): module paths of the conv/linear calls whose weight is (not) dequantized int8."""
    quantized: list[str] = []
    floating: list[str] = []
    for node in graph.nodes:
        if node.op != "call_function" or str(node.target) not in WEIGHTED_OPS or len(node.args) < 2:
            continue
        weight = node.args[1]
        is_int8 = (
            isinstance(weight, torch.fx.Node)
            and weight.op == "call_function"
            and bool(DEQUANTIZE_WEIGHT.search(str(weight.target)))
        )
        path = module_path(node)[0] or node.name
        (quantized if is_int8 else floating).append(path)
    return quantized, floating


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what a saved program carries as weights)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def strip_dead_weights(module: torch.fx.GraphModule) -> int:
    """Delete parameters and buffers that no get_attr node reads; return the bytes freed.

    `convert_pt2e` folds the int8 weights into new constants and leaves the fp32 originals behind, which
    would make the program bigger than the float one (58.5 MB against 11.8 MB on a ResNet-18).
    """
    used = {str(n.target) for n in module.graph.nodes if n.op == "get_attr"}
    freed = 0
    named = list(module.named_parameters(remove_duplicate=False)) + list(
        module.named_buffers(remove_duplicate=False)
    )
    for name, tensor in named:
        if name in used:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if hasattr(owner, attr):
            freed += tensor.numel() * tensor.element_size()
            delattr(owner, attr)
    return freed


def quantize_pt2e(
    program: torch.export.ExportedProgram,
    *,
    mode: str,
    example_inputs: tuple[Any, ...],
    calibrate: Callable[[nn.Module], None] | None = None,
    train: Callable[[nn.Module], None] | None = None,
    per_channel: bool = True,
    observer: str = "histogram",
    exclude: Sequence[str] = (),
    reduce_range: bool | None = None,
) -> QuantizedProgram:
    """Quantize a torch.export program with torchao's X86InductorQuantizer (int8, u8 activations).

    Args:
        program: the uploaded float program; its dynamic dimensions (the batch) are kept.
        mode: "static" (calibrate), "qat" (fake-quantize, train, convert) or "dynamic" (Linear; activations
            quantized per batch at run time).
        example_inputs: positional inputs for re-export, with batch >= 2 (a batch of 1 specializes the dim).
        calibrate: runs calibration batches through the prepared module (eval mode, no_grad); required for
            "static", optional for "qat" (initialises the observers before training).
        train: runs the training loop on the prepared module (train mode); required for "qat".
        per_channel: must be True: Inductor lowers per-channel int8 weights only (support.X86_PER_TENSOR).
        observer: activation observer for "static": "histogram", "minmax" or "moving_average".
        exclude: module paths ("features.0", a prefix of nested ones) or layer types ("Linear") kept float.
        reduce_range: 7-bit activations; None decides from the CPU (True without VNNI, as torchao advises).

    Returns:
        QuantizedProgram: the q/dq program re-exported with the dynamic dims, dead fp32 weights stripped.

    Raises:
        EngineError: nothing_quantized when no conv/linear got int8 weights; unsupported_combination for
            per-tensor weights.
        ValueError: an unknown mode or observer, or a missing callback.

    Example:
        >>> q = quantize_pt2e(ep, mode="static", example_inputs=(x,), calibrate=lambda m: [m(b) for b in batches])
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    if observer not in OBSERVERS:
        raise ValueError(f"observer {observer!r} is unknown: use one of {', '.join(OBSERVERS)}")
    if mode == "static" and calibrate is None:
        raise ValueError(
            "static quantization needs calibrate: a function that runs batches through the model"
        )
    if mode == "qat" and train is None:
        raise ValueError("QAT needs train: a function that runs the training loop on the prepared model")
    if not per_channel:
        raise EngineError("unsupported_combination", X86_PER_TENSOR)
    if reduce_range is None:
        isa = cpu_info()["isa"]
        reduce_range = not any(flag in isa for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
    notes: list[str] = []
    shapes = dynamic_shapes_of(program)
    with quiet():
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

        # pt2e prepares the pre-dispatch graph of a fresh export (what torch.export.export(...).module() is).
        graph_module = torch.export.export(program.module(), example_inputs, dynamic_shapes=shapes).module()
        split_shared_activations(graph_module.graph)
        config = quantization_config(mode, observer, reduce_range)
        quantizer, single = make_quantizer(graph_module.graph, config, exclude, notes)
        if mode != "dynamic":  # dynamic mode quantizes Linear layers only
            notes.extend(SINGLE_CHANNEL_NOTE.format(path=path) for path in single)
        prepare = prepare_qat_pt2e if mode == "qat" else prepare_pt2e
        prepared = prepare(graph_module, quantizer)
        if calibrate is not None:
            move_exported_model_to_eval(prepared)
            with torch.no_grad():
                calibrate(prepared)
        elif mode == "dynamic":
            with torch.no_grad():
                prepared(*example_inputs)  # weight observers need one pass; activations are observed live
        if train is not None and mode == "qat":
            move_exported_model_to_train(prepared)
            train(prepared)
        move_exported_model_to_eval(prepared)
        converted = convert_pt2e(prepared)
        quantized, floating = layer_report(converted.graph)
        if not quantized:
            hint = (
                "every candidate layer is excluded"
                if floating and exclude
                else "its only convolutions have 1 input channel, which stay float with a dynamic batch: use "
                "backend fbgemm"
                if single and mode != "dynamic"
                else "the model has no Conv or Linear layer that the x86 quantizer handles"
            )
            raise EngineError("nothing_quantized", f"{NOTHING}: {hint}")
        stripped = strip_dead_weights(converted)
        with torch.no_grad():
            result = torch.export.export(converted, example_inputs, dynamic_shapes=shapes)
    return QuantizedProgram(result, quantized, floating, stripped, notes)


def example_inputs(job: Job) -> tuple[Any, ...]:
    """Inputs to re-export the program with: batch 2 unless fixed (a batch of 1 would specialize the dim)."""
    specs = job.loaded.info.inputs
    return tuple(job.random_batch(fixed_batch(specs) or 2, job.config.seed).values())


def pt2e_train(model: Any) -> None:
    from torchao.quantization.pt2e import move_exported_model_to_train

    move_exported_model_to_train(model)


def pt2e_eval(model: Any) -> None:
    from torchao.quantization.pt2e import move_exported_model_to_eval

    move_exported_model_to_eval(model)


def freeze_pt2e(model: torch.fx.GraphModule) -> None:
    """Freeze a pt2e QAT model's observers and batch-norm statistics (torch.ao's disable_observer and
    freeze_bn_stats do not know its modules and graph): batch norms switch to their running statistics."""
    from torchao.quantization.pt2e import disable_observer

    model.apply(disable_observer)
    for node in model.graph.nodes:
        if node.op == "call_function" and str(node.target) in BATCH_NORMS and len(node.args) > 5:
            args = list(node.args)
            args[5] = False  # training: use and keep the running mean and variance
            node.args = tuple(args)
    model.recompile()
