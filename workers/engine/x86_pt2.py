"""The x86 backend's glue for `.pt2` jobs: pt2e results as Int8Models, the same-build fp32 package, sizes.

The handlers (static.py, dynamic.py, qat.py) call `x86.quantize_pt2e` with their own calibration batches and
training loop; what they get back becomes an `Int8Model` of kind "aoti", compiled by outcome.build into
`model.int8.aoti.pt2`. The fp32 program is compiled the same way only for the backend that is kept, once.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from workers.engine.pipeline import Int8Model, Job
from workers.engine.verify import call_model, fixed_batch
from workers.engine.x86 import QuantizedProgram, compile_aoti, dynamic_shapes_of, load_aoti

__all__ = [
    "aoti_model",
    "example_inputs",
    "freeze_pt2e",
    "package_parts",
    "pt2e_eval",
    "pt2e_train",
    "same_build_package",
]

FP32_PACKAGE = "model.fp32.aoti.pt2"
CONSTANTS = (b"_binary_constants_bin_start", b"_binary_constants_bin_end")
BATCH_NORMS = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default")


def example_inputs(job: Job) -> tuple[Any, ...]:
    """Inputs to re-export the program with: batch 2 unless fixed (a batch of 1 would specialize the dim)."""
    specs = job.loaded.info.inputs
    return tuple(job.random_batch(fixed_batch(specs) or 2, job.config.seed).values())


def same_build_package(job: Job) -> Any:
    """The uploaded fp32 program compiled like the int8 one (AOTInductor), loaded; compiled once per job.

    Like the int8 program, it is re-exported with `example_inputs` first: a package checks the strides its
    program was exported with, and an upload exported from numpy's `x[:, None]` (stride 0 on the channel) was
    refused every contiguous input. It is run once here, so that a failure costs only the comparison.
    """
    if "fp32_aoti" not in job.cache:
        program, example = job.loaded.program, example_inputs(job)
        with torch.no_grad():
            fresh = torch.export.export(program.module(), example, dynamic_shapes=dynamic_shapes_of(program))
        folder = Path(tempfile.mkdtemp(prefix=".fp32-", dir=job.out_dir))
        try:  # the loaded package keeps its own extracted copy: the file can go
            package = load_aoti(compile_aoti(fresh, folder / FP32_PACKAGE))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        call_model(package, job.random_batch(len(example[0]), job.config.seed), by_name=False)
        job.cache["fp32_aoti"] = package
    return job.cache["fp32_aoti"]


def aoti_model(job: Job, quantized: QuantizedProgram, reference: Any = None) -> Int8Model:
    """The pt2e program as an Int8Model of kind "aoti" (compiled and verified by outcome.build)."""
    job.notes.extend(quantized.warnings)
    return Int8Model(
        quantized.program,
        len(quantized.quantized),
        len(quantized.float_layers),
        reference=reference,
        kind="aoti",
        make_same_build=lambda: same_build_package(job),
    )


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


def _constants_bytes(data: bytes) -> int | None:
    """Size of the weights blob AOTInductor links into a .so (between its two marker symbols), from the ELF."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:  # 64-bit little-endian only
        return None
    shoff, shentsize, shnum = struct.unpack_from("<Q", data, 0x28)[0], *struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    found: dict[bytes, int] = {}
    for _, kind, _, _, offset, size, link, _, _, entsize in sections:
        if kind not in (2, 11) or not entsize:  # SHT_SYMTAB, SHT_DYNSYM
            continue
        strings = sections[link]
        base = strings[4]
        for at in range(offset, offset + size, entsize):
            name_at, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, at)
            end = data.index(b"\x00", base + name_at)
            name = data[base + name_at : end]
            if name in CONSTANTS:
                found[name] = value
        if len(found) == 2:
            return found[CONSTANTS[1]] - found[CONSTANTS[0]]
    return None


def package_parts(package: str | Path) -> tuple[int, int]:
    """(weight bytes, code bytes) of an AOTInductor package: the constants linked into its .so files, and the
    rest of those .so files (the compiled kernels and wrapper)."""
    weights = code = 0
    with zipfile.ZipFile(package) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".so"):
                continue
            try:
                constants = _constants_bytes(zf.read(info.filename)) or 0
            except (struct.error, ValueError, IndexError):
                constants = 0  # an unexpected layout: count it all as code rather than fail the job
            weights += constants
            code += info.file_size - constants
    return weights, code
