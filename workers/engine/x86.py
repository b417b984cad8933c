"""The x86 backend for `.pt2` programs: torchao pt2e (X86InductorQuantizer) compiled by AOTInductor.

    quantized = quantize_pt2e(program, mode="static", example_inputs=(x,), calibrate=run_batches)
    package = compile_aoti(quantized.program, out_dir / ARTIFACT, require_int8=True)
    model = load_aoti(package)        # model(x) -> output, checks input shapes

The q/dq program that `convert_pt2e` returns is slower than fp32 when run eagerly; the speed comes from
Inductor's oneDNN int8 kernels, frozen into an AOTInductor package that plain torch loads
(ENGINE_NOTES.md, "Fast x86 artifact"). The package's `.so` targets the compiling CPU's ISA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config
from torch import nn

from qaas.contract.support import X86_PER_TENSOR
from workers.engine.cpu import cpu_info
from workers.engine.errors import EngineError
from workers.engine.result import atomic_write
from workers.engine.x86_quantizer import (
    SINGLE_CHANNEL_NOTE,
    make_quantizer,
    module_path,
    quantization_config,
    split_shared_activations,
)

__all__ = [
    "ARTIFACT",
    "MODES",
    "OBSERVERS",
    "QuantizedProgram",
    "compile_aoti",
    "dynamic_shapes_of",
    "int8_kernel_count",
    "layer_report",
    "load_aoti",
    "quantize_pt2e",
    "state_bytes",
    "strip_dead_weights",
]

ARTIFACT = "model.int8.aoti.pt2"
MODES = ("static", "qat", "dynamic")
OBSERVERS = ("histogram", "minmax", "moving_average")
WEIGHTED_OPS = {
    "aten.conv1d.default",
    "aten.conv2d.default",
    "aten.conv3d.default",
    "aten.linear.default",
}
DEQUANTIZE_WEIGHT = re.compile(r"quantized_decomposed\.dequantize_per_(channel|tensor)")
# The wrapper of an AOTInductor package calls oneDNN int8 kernels through these shims.
INT8_KERNEL = re.compile(r"aoti_torch_cpu__(qconv\w*|qlinear\w*)\(")
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


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torchao logs every optional CUDA library it cannot load, and pt2e warns about deprecated paths."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|torchao)(\.|$)")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


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
    with _quiet():
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


def int8_kernel_count(package: str | Path) -> int | None:
    """How many oneDNN int8 conv/linear calls an AOTInductor package's wrapper makes (None: no source kept)."""
    with zipfile.ZipFile(package) as zf:
        sources = [n for n in zf.namelist() if n.endswith("wrapper.cpp")]
        if not sources:
            return None
        return sum(len(INT8_KERNEL.findall(zf.read(n).decode("utf-8", "replace"))) for n in sources)


def compile_aoti(
    program: torch.export.ExportedProgram,
    out_path: str | Path,
    *,
    freezing: bool = True,
    require_int8: bool = False,
) -> Path:
    """Compile a program (int8 or fp32) into an AOTInductor package, written atomically.

    Runs under no_grad (without it the package silently keeps fp32 convolutions) with weight freezing, and
    without debug information (its .so files carry no .debug_* sections). Inductor compiles with
    TORCHINDUCTOR_COMPILE_THREADS threads (1 when unset: a sandbox that limits processes breaks a compile
    pool) and caches in TORCHINDUCTOR_CACHE_DIR when set. Takes 10-40 s on 2 cores.

    Args:
        program: an ExportedProgram (`quantize_pt2e(...).program`, or the float upload for a same-build
            baseline).
        out_path: where the package goes, e.g. out_dir / ARTIFACT; it must end in ".pt2".
        freezing: fold weights into constants (what makes the oneDNN int8 kernels apply).
        require_int8: raise when the compiled wrapper calls no int8 kernel (and remove the package).

    Raises:
        EngineError: nothing_quantized when require_int8 and the package runs no int8 conv/linear.
    """
    out_path = Path(out_path)
    if out_path.suffix != ".pt2":
        raise ValueError(f"an AOTInductor package path must end in .pt2, got {out_path.name!r}")
    configs = {
        "freezing": freezing,
        "compile_threads": int(os.environ.get("TORCHINDUCTOR_COMPILE_THREADS", "1")),
        # A dynamic batch is compiled for sizes >= 2 (0/1 specialization); the kernels are correct at 1, but
        # AOTI_RUNTIME_CHECK_INPUTS would refuse a batch of 1 without this.
        "aot_inductor.check_lowerbound": False,
        # On by default, it compiles with -g1: 1.1 MB of DWARF in every .so (1.5 MB of a 1.6 MB package for
        # a 120 KB CNN), read by profilers, never when the package runs.
        "aot_inductor.enable_line_tables": False,
    }

    def write(temp: Path) -> None:
        # Without size-oblivious reasoning, the fake convolution's oneDNN heuristic (`batch >= 16`) is decided
        # from the example batch and narrows the batch to 2..15 in the package: batch 16 was refused.
        oblivious = torch.fx.experimental._config.patch(backed_size_oblivious=True)  # type: ignore[attr-defined]
        with open(temp, "wb") as f, torch.no_grad(), _quiet(), oblivious:
            torch._inductor.aoti_compile_and_package(program, package_path=f, inductor_configs=configs)

    atomic_write(out_path, write)
    if require_int8 and int8_kernel_count(out_path) == 0:
        out_path.unlink(missing_ok=True)
        raise EngineError(
            "nothing_quantized",
            "the compiled package runs no int8 convolution or linear kernel (Inductor kept them in fp32)",
        )
    return out_path


def load_aoti(path: str | Path) -> Callable[..., Any]:
    """Load an AOTInductor package as a callable (positional inputs) that checks input shapes and dtypes.

    Sets AOTI_RUNTIME_CHECK_INPUTS=1 for the process first: without it a package given the wrong batch
    silently answered with the wrong number of rows. The package reads the variable once, on its first call.
    """
    os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"
    try:
        return torch._inductor.aoti_load_package(str(path))
    except Exception as exc:
        raise EngineError(
            "model_load_failed",
            f"the AOTInductor package {Path(path).name} does not load ({type(exc).__name__}: {exc}); it needs "
            "the torch version and CPU ISA it was compiled for",
        ) from exc
