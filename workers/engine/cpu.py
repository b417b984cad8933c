"""What this CPU and torch build can run, and which measured backend `auto` keeps.

Pure and cheap: reading /proc/cpuinfo and a few lookups; torch is imported only by `supported_backends`.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from collections.abc import Mapping
from typing import Any

from qaas.contract.backends import DECLARATIONS, HostNeed

__all__ = ["ISA_FLAGS", "SPEED_TIE", "choose_backend", "cpu_info", "supported_backends", "unmet_need"]

# The flags that decide int8 speed: VNNI does u8*s8 dot products in one instruction, AMX does whole tiles
# (14x int8 speedups on a ResNet-18 with oneDNN against 3.6x with fbgemm, docs/engine-notes.md).
ISA_FLAGS = ("avx2", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
# Candidates within 10% of the fastest count as equally fast (docs/engine-notes.md, "auto measures the candidates").
SPEED_TIE = 0.10


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict[str, Any]:
    """The host facts that explain int8 speed: {"model", "isa", "logical_cpus", "machine"}.

    Args:
        cpuinfo_path: the file to read (tests pass a fixture); a missing file gives an empty "isa".

    Returns:
        "model" is the CPU model name, "isa" the flags of ISA_FLAGS the CPU has (in that order).

    Example:
        >>> cpu_info()["isa"]
        ['avx2', 'avx512_vnni', 'avx_vnni']
    """
    model, flags = "", set[str]()
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not model:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())  # every core lists the same flags: read the first
    except OSError:
        pass
    return {
        "model": model or platform.processor() or platform.machine(),
        "isa": [flag for flag in ISA_FLAGS if flag in flags],
        "logical_cpus": os.cpu_count() or 1,
        "machine": platform.machine(),
    }


def has_cxx_compiler() -> bool:
    """Whether AOTInductor finds a C++ compiler: $CXX, else g++ (what torch._inductor searches)."""
    return shutil.which(os.environ.get("CXX") or "g++") is not None


def unmet_need(need: HostNeed) -> str | None:
    """What this worker lacks of a backend's declared need (qaas.contract.backends), or None when it has it."""
    import torch

    if need.quantized_engine not in torch.backends.quantized.supported_engines:
        return f"the {need.quantized_engine} quantized engine"
    missing = [name for name in need.modules if importlib.util.find_spec(name) is None]
    if missing:
        return ", ".join(missing)
    if need.compiler and not has_cxx_compiler():
        return "a C++ compiler"
    return None


def supported_backends(model_format: str) -> list[str]:
    """The backends this worker can serve for a model format, in the declarations' order ("fbgemm" first).

    Each backend declares what it needs (qaas.contract.backends): "fbgemm" and "x86" the torch.ao quantized
    engine of that name; for "pt2", "x86" is the torchao pt2e flow compiled by AOTInductor, so it also needs
    torchao installed and a C++ compiler on PATH.

    Example:
        >>> supported_backends("pt2")
        ['fbgemm', 'x86']
    """
    backends = []
    for declaration in DECLARATIONS:
        need = declaration.need(model_format)
        if need is not None and unmet_need(need) is None:
            backends.append(str(declaration.name))
    return backends


def choose_backend(candidates: Mapping[str, Mapping[str, float]]) -> tuple[str, str]:
    """Pick the backend `auto` keeps from measured candidates: the fastest, unless a more faithful one is
    within 10% of its speed (docs/engine-notes.md, "auto measures the candidates").

    Args:
        candidates: {name: {"int8_ms_p50": latency in ms, "cosine": output cosine against float}}, measured on
            the same CPU, batches and data.

    Returns:
        (name, reason): the reason names the numbers that decided, for the report.

    Raises:
        ValueError: no candidate, or a latency that is not a positive number.

    Example:
        >>> choose_backend({"fbgemm": {"int8_ms_p50": 1.0, "cosine": 0.99},
        ...                 "x86": {"int8_ms_p50": 1.05, "cosine": 0.999}})
        ('x86', 'fbgemm and x86 are within 10% in speed ...')
    """
    if not candidates:
        raise ValueError("choose_backend needs at least one measured candidate")
    for name, numbers in candidates.items():
        latency = numbers["int8_ms_p50"]
        if not latency > 0:  # also catches NaN
            raise ValueError(f"candidate {name!r} has int8_ms_p50={latency!r}: give a measured latency > 0")
    if len(candidates) == 1:
        name = next(iter(candidates))
        return name, f"{name} is the only candidate"

    def ms(name: str) -> float:
        return float(candidates[name]["int8_ms_p50"])

    def cosine(name: str) -> float:
        value = float(candidates[name]["cosine"])
        return value if value == value else float("-inf")  # NaN fidelity never wins

    order = [str(d.name) for d in DECLARATIONS]  # equal latencies: the declarations' order, then the name
    by_speed = sorted(candidates, key=lambda n: (ms(n), order.index(n) if n in order else len(order), n))
    fastest = by_speed[0]
    close = [n for n in by_speed if ms(n) <= ms(fastest) * (1 + SPEED_TIE)]
    # Among the equally fast, the most faithful; a tie in fidelity goes to the faster one.
    best = max(close, key=lambda n: (cosine(n), -ms(n)))
    timing = ", ".join(f"{n} {ms(n):.3g} ms" for n in by_speed)
    if best == fastest:
        if len(close) == 1:
            return best, f"{best} is the fastest int8 model ({timing})"
        return best, (
            f"{' and '.join(sorted(close))} are within 10% in speed ({timing}); {best} is faster and at "
            f"least as faithful (cosine {cosine(best):.6g})"
        )
    others = ", ".join(f"{n} {cosine(n):.6g}" for n in close if n != best)
    return best, (
        f"{' and '.join(sorted(close))} are within 10% in speed ({timing}); {best} is more faithful "
        f"(cosine {cosine(best):.6g} against {others})"
    )
