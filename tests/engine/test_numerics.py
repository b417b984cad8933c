"""The engine's numbers are torch.ao's numbers: the same kernels, the same rounding, an exact zero."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from qaas.contract.jobs import DynamicConfig, StaticConfig
from tests.engine.conftest import FAST_BENCHMARK
from workers.engine.api import quantize
from workers.engine.static import static_qconfig


@pytest.fixture(autouse=True)
def fbgemm() -> None:
    torch.backends.quantized.engine = "fbgemm"


def test_dynamic_from_a_program_equals_eager_quantize_dynamic(tmp_path: Path) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    path = tmp_path / "seq.pt2"  # nn.Sequential names its input "input"
    batch = {"input": {0: torch.export.Dim("batch")}}
    torch.export.save(torch.export.export(model, (torch.randn(2, 32),), dynamic_shapes=batch), str(path))
    result = quantize(
        path, DynamicConfig(backend="fbgemm", benchmark=FAST_BENCHMARK), out_dir=tmp_path / "out"
    )
    engine = torch.jit.load(str(result.artifacts[0].path))
    eager = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(engine(x), eager(x))


def hand_quantize(x: torch.Tensor, scale: float, zero_point: int, low: int, high: int) -> torch.Tensor:
    """q = clamp(round(x / scale) + zero_point, low, high) in the kernel's arithmetic.

    fbgemm multiplies by a float32 1/scale and adds the zero point in one fused multiply-add (one rounding,
    emulated here in float64), then rounds half to even: plain `x / scale` differs at a few exact ties.
    """
    inverse = 1.0 / torch.tensor(scale, dtype=torch.float32)
    fused = (x.double() * inverse.double() + zero_point).float()
    return torch.clamp(torch.round(fused), low, high).to(torch.int64)


def check_formula(
    q: torch.Tensor, x: torch.Tensor, scale: float, zero_point: int, low: int, high: int
) -> None:
    codes = q.int_repr().to(torch.int64)
    assert torch.equal(codes, hand_quantize(x, scale, zero_point, low, high))
    textbook = torch.clamp(torch.round(x / scale) + zero_point, low, high)
    assert (codes - textbook).abs().max() <= 1  # the textbook formula, but for ties
    assert torch.allclose(q.dequantize(), (codes - zero_point) * scale)


def test_static_per_tensor_follows_the_affine_formula_with_an_exact_zero() -> None:
    config = StaticConfig(backend="fbgemm", weight_granularity="per_tensor", activation_observer="minmax")
    qconfig = static_qconfig(config)
    x = torch.cat([torch.randn(1000, generator=torch.Generator().manual_seed(8)) * 3 + 1, torch.zeros(1)])

    observer = qconfig.activation()
    observer(x)
    scale, zero_point = (v.item() for v in observer.calculate_qparams())
    # fbgemm keeps 7 bits for activations (reduce_range): the observed range maps into 0..127.
    assert (observer.quant_min, observer.quant_max, observer.dtype) == (0, 127, torch.quint8)
    assert scale == pytest.approx((float(x.max()) - float(x.min())) / 127, rel=1e-6)
    q = torch.quantize_per_tensor(x, scale, int(zero_point), torch.quint8)
    check_formula(q, x, scale, int(zero_point), 0, 127)
    assert q.int_repr()[-1] == zero_point  # 0.0 is exactly representable
    assert q.dequantize()[-1].item() == 0.0

    weight_observer = qconfig.weight()
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(9))
    weight_observer(w)
    w_scale, w_zero = (v.item() for v in weight_observer.calculate_qparams())
    assert w_zero == 0 and weight_observer.qscheme == torch.per_tensor_symmetric
    assert w_scale == pytest.approx(float(w.abs().max()) / 127.5, rel=1e-6)  # symmetric over -128..127
    check_formula(torch.quantize_per_tensor(w, w_scale, 0, torch.qint8), w, w_scale, 0, -128, 127)
    assert torch.quantize_per_tensor(torch.zeros(3), w_scale, 0, torch.qint8).dequantize().abs().sum() == 0
