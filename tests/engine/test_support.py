"""The support matrix as data: its shape, its refusal sentences, and that the API can read it without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qaas.contract.support import (
    BACKENDS,
    CONCRETE_BACKENDS,
    FORMATS,
    MODES,
    SUPPORT,
    backends_for,
    option_refusal,
    refusal,
)


def test_the_table_covers_every_format_and_mode_and_lists_auto_where_a_backend_applies() -> None:
    assert set(SUPPORT) == set(FORMATS)
    for fmt, modes in SUPPORT.items():
        assert set(modes) == set(MODES)
        for mode, listed in modes.items():
            assert set(listed) <= set(BACKENDS)
            assert ("auto" in listed) == any(b in listed for b in CONCRETE_BACKENDS), (fmt, mode)


def test_the_served_cells() -> None:
    served = {(f, m): backends_for(f, m) for f in FORMATS for m in MODES}
    assert served == {
        ("pt2", "dynamic"): ("fbgemm", "x86"),
        ("pt2", "static"): ("fbgemm", "x86"),
        ("pt2", "qat"): ("fbgemm", "x86"),
        ("torchscript", "dynamic"): ("fbgemm", "x86"),
        ("torchscript", "static"): ("fbgemm", "x86"),
        ("torchscript", "qat"): (),
        ("hf", "dynamic"): ("fbgemm", "x86"),
        ("hf", "static"): (),
        ("hf", "qat"): (),
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals_name_what_works(backend: str) -> None:
    for fmt in FORMATS:
        for mode in MODES:
            sentence = refusal(fmt, mode, backend)
            assert (sentence is None) == (backend in SUPPORT[fmt][mode]), (fmt, mode, backend)
    assert (refusal("hf", "static", backend) or "").startswith(
        "Hugging Face models are served in dynamic mode: "
    )
    assert "use mode dynamic" in (refusal("hf", "qat", backend) or "")
    assert "use mode static or dynamic" in (refusal("torchscript", "qat", backend) or "")


def test_unknown_values_are_refused() -> None:
    assert "'onnx' are not quantized: upload a .pt2" in (refusal("onnx", "dynamic", "auto") or "")
    assert refusal("pt2", "turbo", "auto") == "mode 'turbo' is unknown: use dynamic, static or qat"
    assert "backend 'onednn' is unknown" in (refusal("pt2", "static", "onednn") or "")


def test_option_level_refusals() -> None:
    per_tensor = {"weight_granularity": "per_tensor"}
    for mode in ("static", "qat"):
        sentence = refusal("pt2", mode, "x86", **per_tensor) or ""
        assert "use weight_granularity per_channel, or backend fbgemm" in sentence
        # Why: checked on torch 2.13, Inductor ran per-tensor int8 weights as fp32 layers.
        assert "Inductor compiles per-tensor int8 weights as fp32 layers" in sentence
        assert refusal("pt2", mode, "fbgemm", **per_tensor) is None
        assert refusal("pt2", mode, "auto", **per_tensor) is None  # auto keeps fbgemm
        assert backends_for("pt2", mode, **per_tensor) == ("fbgemm",)
        # TorchScript on the x86 engine takes per-tensor weights.
        assert refusal("torchscript", mode, "x86", **per_tensor) == refusal("torchscript", mode, "x86")
    embeddings = {"quantize_embeddings": True}
    assert "backend fbgemm for quantize_embeddings" in (refusal("pt2", "dynamic", "x86", **embeddings) or "")
    assert backends_for("pt2", "dynamic", **embeddings) == ("fbgemm",)
    assert refusal("hf", "dynamic", "x86", **embeddings) is None  # the word embeddings, on either engine
    ts = refusal("torchscript", "dynamic", "auto", **embeddings) or ""
    assert ts.startswith("quantize_embeddings needs a .pt2") and ts == option_refusal(
        "torchscript", "dynamic", "fbgemm", **embeddings
    )
    assert refusal("pt2", "dynamic", "x86", quantize_embeddings=None) is None


def test_support_imports_no_torch() -> None:
    code = "import sys, qaas.contract.support; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
