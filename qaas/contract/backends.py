"""The int8 backends, declared once: what each serves, the options it refuses, what it needs of the host.

One `BackendDeclaration` per concrete backend. Everything else that names backends is derived from
`DECLARATIONS`: the support matrix and its refusals (`qaas.contract.support`), `GET /v1/capabilities`, `auto`'s
candidates and the engine's registry (`workers.engine.lowering`, one module per backend that converts, saves
and loads). Pure Python, like the rest of the contract. How to add a backend: docs/adding-a-backend.md.

    X86.serves[Format.PT2]        # (Mode.DYNAMIC, Mode.STATIC, Mode.QAT)
    X86.limit("pt2", "static", weight_granularity="per_tensor")   # the sentence that says what works
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qaas.contract.vocab import Backend, Format, Mode

__all__ = [
    "ARTIFACT_FILES",
    "BY_NAME",
    "CONCRETE",
    "DECLARATIONS",
    "FBGEMM",
    "X86",
    "X86_PER_TENSOR",
    "BackendDeclaration",
    "HostNeed",
    "Limit",
]

ALL_MODES = (Mode.DYNAMIC, Mode.STATIC, Mode.QAT)
# TorchScript graph mode has no QAT; Hugging Face encoders are served dynamically (qaas.contract.support).
TORCH_AO_CELLS: Mapping[Format, tuple[Mode, ...]] = {
    Format.PT2: ALL_MODES,
    Format.TORCHSCRIPT: (Mode.DYNAMIC, Mode.STATIC),
    Format.HF: (Mode.DYNAMIC,),
}
# What `auto` records and goes on from: a problem of one backend, not of the request (the job's inputs).
BACKEND_ERRORS = frozenset({"unsupported_combination", "verification_failed"})


@dataclass(frozen=True)
class Limit:
    """An option value a backend refuses on some cells, with the sentence that says what works instead."""

    option: str  # a job option: "weight_granularity", "quantize_embeddings"
    values: tuple[Any, ...]  # the refused values (True for a switch that is on)
    formats: tuple[Format, ...]
    modes: tuple[Mode, ...]
    message: str

    def applies(self, fmt: str, mode: str, options: Mapping[str, Any]) -> bool:
        value = options.get(self.option)
        return fmt in self.formats and mode in self.modes and value is not None and value in self.values


@dataclass(frozen=True)
class HostNeed:
    """What a worker must have to run a backend for some formats, and the sentence said when it lacks it.

    `quantized_engine` is a `torch.backends.quantized` engine; `modules` are importable packages;
    `compiler` asks for a C++ compiler on PATH (AOTInductor).
    """

    formats: tuple[Format, ...]
    quantized_engine: str
    why: str
    modules: tuple[str, ...] = ()
    compiler: bool = False


@dataclass(frozen=True)
class BackendDeclaration:
    """One concrete backend: its name, what it serves, what it refuses, its recoverable errors, its needs.

    `needs` are checked in order: the first whose formats include the model's format decides.
    """

    name: Backend
    description: str
    serves: Mapping[Format, tuple[Mode, ...]]
    needs: tuple[HostNeed, ...]
    limits: tuple[Limit, ...] = ()
    recoverable: frozenset[str] = BACKEND_ERRORS

    def serves_cell(self, fmt: str, mode: str) -> bool:
        return mode in self.serves.get(fmt, ())  # type: ignore[call-overload]

    def limit(self, fmt: str, mode: str, **options: Any) -> str | None:
        """The sentence of the first limit these options hit on this cell, or None."""
        return next((lim.message for lim in self.limits if lim.applies(fmt, mode, options)), None)

    def need(self, fmt: str) -> HostNeed | None:
        """What the host must have to run this backend for a model format."""
        return next((need for need in self.needs if fmt in need.formats), None)


# Checked on torch 2.13 / torchao 0.18: a per-tensor weight spec quantizes, but Inductor's int8 lowering
# matches dequantize_per_channel weights only, and the package ran every layer in fp32.
X86_PER_TENSOR = (
    "backend x86 quantizes .pt2 weights per channel only: torchao's X86InductorQuantizer has no per-tensor "
    "weights, and Inductor compiles per-tensor int8 weights as fp32 layers; use weight_granularity "
    "per_channel, or backend fbgemm for per-tensor weights"
)
# A limit of the format's flow (TorchScript graph mode), which every backend that serves it shares.
GRAPH_MODE_EMBEDDINGS = Limit(
    "quantize_embeddings",
    (True,),
    (Format.TORCHSCRIPT,),
    (Mode.DYNAMIC,),
    "quantize_embeddings needs a .pt2 (torch.export) or Hugging Face upload: TorchScript graph mode "
    "quantizes Linear layers only; turn quantize_embeddings off",
)
NO_ENGINE = "this worker's torch has no {name} quantized engine (x86-64 CPUs only)"
ALL_FORMATS = (Format.PT2, Format.TORCHSCRIPT, Format.HF)

FBGEMM = BackendDeclaration(
    name=Backend.FBGEMM,
    description="torch.ao (FX graph mode, quantize_dynamic, TorchScript graph mode) on the fbgemm engine, "
    "saved as TorchScript",
    serves=TORCH_AO_CELLS,
    needs=(HostNeed(ALL_FORMATS, "fbgemm", NO_ENGINE.format(name="fbgemm")),),
    limits=(GRAPH_MODE_EMBEDDINGS,),
)

X86 = BackendDeclaration(
    name=Backend.X86,
    description="torchao pt2e (X86InductorQuantizer) compiled by AOTInductor for a .pt2; torch.ao on the x86 "
    "engine, saved as TorchScript, for TorchScript and Hugging Face uploads",
    serves=TORCH_AO_CELLS,
    needs=(
        HostNeed(
            (Format.PT2,),
            "x86",
            "the x86 backend compiles .pt2 models with AOTInductor, which needs torchao and a C++ compiler",
            modules=("torchao",),
            compiler=True,
        ),
        HostNeed((Format.TORCHSCRIPT, Format.HF), "x86", NO_ENGINE.format(name="x86")),
    ),
    limits=(
        Limit("weight_granularity", ("per_tensor",), (Format.PT2,), (Mode.STATIC, Mode.QAT), X86_PER_TENSOR),
        Limit(
            "quantize_embeddings",
            (True,),
            (Format.PT2,),
            (Mode.DYNAMIC,),
            "backend x86 quantizes the Linear layers of a .pt2 dynamically, not its embeddings: use backend "
            "fbgemm for quantize_embeddings, or turn quantize_embeddings off",
        ),
        GRAPH_MODE_EMBEDDINGS,
    ),
    # torchao's quantizer and Inductor fail on models fbgemm serves: a model left in fp32 (nothing_quantized)
    # or a package that does not load on this CPU is x86's limit, and auto keeps the other candidates.
    recoverable=BACKEND_ERRORS | {"nothing_quantized", "model_load_failed"},
)

# In preference order: `auto` builds its candidates in this order.
DECLARATIONS: tuple[BackendDeclaration, ...] = (FBGEMM, X86)
BY_NAME: Mapping[str, BackendDeclaration] = {str(d.name): d for d in DECLARATIONS}
CONCRETE: tuple[str, ...] = tuple(BY_NAME)
# The artifact files a backend may write, by name, with their format: the worker takes only these from a
# runner (workers.tasks), and the engine's artifact kinds must be these (workers.engine.lowering).
ARTIFACT_FILES: Mapping[str, str] = {"model.int8.ts": "torchscript", "model.int8.aoti.pt2": "aoti_package"}
