"""AOTInductor packages, the x86 backend's artifact for a `.pt2` (`model.int8.aoti.pt2`): compile, load, size.

    package = compile_aoti(quantized.program, out_dir / ARTIFACT, require_int8=True)
    model = load_aoti(package)        # model(x) -> output, checks input shapes

The package's `.so` targets the compiling CPU's ISA. The fp32 program is compiled the same way only for the
backend that is kept, once (`same_build_package`).
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx.experimental._config

from workers.engine.checks.verify import call_model
from workers.engine.cpu import cpu_info
from workers.engine.errors import EngineError
from workers.engine.job import Int8Model, Job
from workers.engine.lowering.base import Artifact
from workers.engine.lowering.x86.pt2e import QuantizedProgram, dynamic_shapes_of, example_inputs
from workers.engine.quiet import quiet
from workers.engine.result import atomic_write

__all__ = [
    "AOTI",
    "ARTIFACT",
    "aoti_model",
    "compile_aoti",
    "int8_kernel_count",
    "load_aoti",
    "package_parts",
    "same_build_package",
]

ARTIFACT = "model.int8.aoti.pt2"
FP32_PACKAGE = "model.fp32.aoti.pt2"
CONSTANTS = (b"_binary_constants_bin_start", b"_binary_constants_bin_end")
# The wrapper of an AOTInductor package calls oneDNN int8 kernels through these shims.
INT8_KERNEL = re.compile(r"aoti_torch_cpu__(qconv\w*|qlinear\w*)\(")
# What runs an AOTInductor package: Inductor's oneDNN int8 kernels, not a torch.ao quantized engine.
AOTI_ENGINE = "x86_inductor"


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
        with open(temp, "wb") as f, torch.no_grad(), quiet(), oblivious:
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


def _snippet(file: str, runner: str, args: str) -> str:
    info = cpu_info()
    isa = ", ".join(info["isa"]) or "no int8 extensions"
    return (
        "import os, torch\n"
        'os.environ["AOTI_RUNTIME_CHECK_INPUTS"] = "1"  # refuse inputs of the wrong shape\n'
        f'model = torch._inductor.aoti_load_package("{file}")\n'
        f"y = model({args})\n"
        f"# Needs torch {torch.__version__} (the version that compiled it) and an {info['machine']} CPU with "
        f"{isa} (compiled on {info['model']}).\n"
    )


AOTI = Artifact(
    kind="aoti",
    file=ARTIFACT,
    file_format="aoti_package",
    build="AOTInductor",
    saving=("converting", 40.0, "compiling the int8 program into an AOTInductor package (10-40 s)"),
    save=lambda program, target: compile_aoti(program, target, require_int8=True),
    load=lambda path, engine: load_aoti(path),
    runner=lambda backend: AOTI_ENGINE,
    parts=package_parts,
    snippet=_snippet,
    compiled_for_cpu=True,
)
