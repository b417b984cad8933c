"""The backend registry: the contract's declarations, the engine's lowerings and the host checks agree."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qaas.contract import backends as declared
from qaas.contract.support import BACKENDS, CONCRETE_BACKENDS, SUPPORT
from qaas.contract.vocab import Backend
from tests.conftest import fail_or_skip
from workers.engine import cpu, lowering
from workers.engine.errors import EngineError


def test_every_backend_word_has_one_declaration_and_one_lowering() -> None:
    words = tuple(str(b) for b in Backend if b is not Backend.AUTO)
    assert declared.CONCRETE == CONCRETE_BACKENDS == words
    assert (*words, "auto") == BACKENDS
    assert tuple(lowering.REGISTRY) == words
    for name, backend in lowering.REGISTRY.items():
        assert backend.name == name and backend.declaration is declared.BY_NAME[name]


def test_the_matrix_is_what_the_declarations_serve() -> None:
    for fmt, modes in SUPPORT.items():
        for mode, listed in modes.items():
            serving = [str(d.name) for d in declared.DECLARATIONS if d.serves_cell(fmt, mode)]
            assert list(listed) == ([*serving, "auto"] if serving else [])


def test_a_host_without_a_compiler_has_no_x86_for_pt2(monkeypatch: pytest.MonkeyPatch) -> None:
    if "x86" not in torch.backends.quantized.supported_engines:
        fail_or_skip("this torch has no x86 quantized engine")
    monkeypatch.setattr(cpu, "has_cxx_compiler", lambda: False)
    assert cpu.supported_backends("pt2") == ["fbgemm"]
    assert cpu.supported_backends("torchscript") == ["fbgemm", "x86"]
    assert lowering.available("pt2") == ["fbgemm"]
    problem = lowering.get("x86").unavailable("pt2")
    assert problem is not None and problem.code == "unsupported_combination"
    assert problem.message == (
        "the x86 backend compiles .pt2 models with AOTInductor, which needs torchao and a C++ compiler on the "
        "worker: use backend fbgemm or auto"
    )
    assert lowering.get("x86").unavailable("torchscript") is None


def test_recoverable_errors_are_the_declared_ones() -> None:
    x86, fbgemm = lowering.get("x86"), lowering.get("fbgemm")
    nothing = EngineError("nothing_quantized", "no layer")
    assert x86.recoverable(nothing) and not fbgemm.recoverable(nothing)
    assert not x86.recoverable(EngineError("dataset_mismatch", "about the request"))
    with pytest.raises(EngineError) as info:
        lowering.get("onnxruntime")
    assert info.value.code == "unsupported_combination"


def test_artifacts_are_found_by_file_name() -> None:
    assert lowering.artifact_for_file("model.int8.aoti.pt2").kind == "aoti"
    assert lowering.artifact_for_file("model.int8.ts").kind == "torchscript"
    assert len({a.file for a in lowering.ARTIFACTS.values()}) == len(lowering.ARTIFACTS)


def test_the_declarations_import_no_torch() -> None:
    code = "import sys, qaas.contract.backends; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
