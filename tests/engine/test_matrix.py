"""Every cell of support.SUPPORT at the engine level: it works (the artifact reloads with plain torch and stays
close to the float model) or it is refused with unsupported_combination and support.refusal's sentence.

Parametrized over the table itself: a cell added to or removed from the matrix is tested without editing
this file (a new format or mode needs its model in conftest_matrix.cell_arguments).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from qaas.contract.support import BACKENDS, CONCRETE_BACKENDS, FORMATS, MODES, SUPPORT, refusal
from tests.engine.conftest_matrix import Cell, CellInputs, cosine, reload, sample_inputs
from workers.engine.cpu import supported_backends

pytest_plugins = ["tests.engine.conftest_static", "tests.engine.conftest_hf", "tests.engine.conftest_matrix"]

CELLS = [(fmt, mode, backend) for fmt in FORMATS for mode in MODES for backend in BACKENDS]
MIN_COSINE = {"dynamic": 0.98, "static": 0.98, "qat": 0.9}  # QAT trains: its outputs move a little


def expected_artifact(fmt: str, backend: str) -> str:
    return "model.int8.aoti.pt2" if fmt == "pt2" and backend == "x86" else "model.int8.ts"


@pytest.mark.parametrize(("fmt", "mode", "backend"), CELLS, ids=["-".join(cell) for cell in CELLS])
def test_cell(
    fmt: str, mode: str, backend: str, run_cell: Callable[..., Cell], cell_inputs: CellInputs
) -> None:
    cell = run_cell(fmt, mode, backend)
    if backend not in SUPPORT[fmt][mode]:
        assert cell.error is not None and cell.error.code == "unsupported_combination"
        assert cell.error.message == refusal(fmt, mode, backend)
        assert not any(cell.out.iterdir())
        return
    if backend == "x86" and "x86" not in supported_backends(fmt):  # no compiler or torchao on this host
        assert cell.error is not None and cell.error.code == "unsupported_combination"
        return
    assert cell.error is None, cell.error
    result = cell.result
    assert result is not None
    print(f"\n{fmt} {mode} {backend}: {result.backend} in {cell.seconds:.1f} s")
    assert result.backend in CONCRETE_BACKENDS and result.backend in SUPPORT[fmt][mode]
    if backend != "auto":
        assert result.backend == backend
    name = expected_artifact(fmt, result.backend)
    assert [a.name for a in result.artifacts] == [name]
    assert sorted(p.name for p in cell.out.iterdir()) == [name]  # no candidates, no fp32 package left
    engine = "x86_inductor" if name.endswith(".pt2") else result.backend
    manifest = result.manifest
    assert manifest["engine"] == result.metrics["environment"]["engine"] == engine
    assert (manifest["backend"], manifest["backend_requested"], manifest["mode"]) == (
        result.backend,
        backend,
        mode,
    )
    for row in result.metrics["latency"]:
        assert row["int8_ms"]["p50"] > 0 and row["speedup_same_build"] > 0
    assert result.metrics["fidelity"]["cosine"] >= MIN_COSINE[mode]
    assert result.metrics["size"]["int8_weight_bytes"] > 0
    assert manifest["calibration_samples"] == (32 if mode in ("static", "qat") else 0)
    model = reload(result)
    for batch in (1, 3):
        reference, args = sample_inputs(cell_inputs, fmt, mode, batch)
        with torch.no_grad():
            got, want = model(*args), reference(*args)
        assert got.shape == want.shape
        assert cosine(got, want) >= MIN_COSINE[mode]
    if backend == "auto":
        table = result.metrics["backends"]
        assert set(table) == {b for b in CONCRETE_BACKENDS if b in SUPPORT[fmt][mode]}
        assert table[result.backend]["artifact"] == name
        assert (
            isinstance(result.metrics["backend_choice"], str)
            and result.backend in result.metrics["backend_choice"]
        )
    else:
        assert "backends" not in result.metrics
