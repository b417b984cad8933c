"""The x86 backend: CPU facts, backend choice, torchao pt2e + AOTInductor, and the TorchScript x86 engine.

AOTInductor compiles cost 10-40 s each on 2 cores: the module compiles three packages (int8 static, its fp32
baseline, int8 dynamic) once, and the digits job two more, in the session's Inductor cache
(conftest_inductor.py, kept between runs).
"""

from __future__ import annotations

import math
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from qaas.contract.jobs import BenchmarkConfig, StaticConfig
from tests.engine.conftest import FAST_BENCHMARK
from tests.engine.conftest_static import Digits, SmallCNN
from workers.engine.api import quantize
from workers.engine.checks.bench import benchmark
from workers.engine.checks.verify import fidelity
from workers.engine.cpu import ISA_FLAGS, choose_backend, cpu_info, supported_backends
from workers.engine.errors import EngineError
from workers.engine.lowering.torchscript import default_mapping, load_torchscript
from workers.engine.lowering.x86.aoti import ARTIFACT, compile_aoti, int8_kernel_count, load_aoti
from workers.engine.lowering.x86.pt2e import QuantizedProgram, quantize_pt2e, state_bytes, strip_dead_weights
from workers.engine.qengine import set_engine

pytest_plugins = ["tests.engine.conftest_static"]

X86_PT2 = "x86" in supported_backends("pt2")
needs_pt2e = pytest.mark.skipif(not X86_PT2, reason="needs torchao and a C++ compiler (AOTInductor)")


class ConvNet(nn.Module):
    """Conv-BN-ReLU, pooling and a Linear head: the patterns the x86 quantizer fuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.bn(self.conv(x)))).flatten(1))


def _export(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch")
    return torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def convnet() -> tuple[nn.Module, torch.export.ExportedProgram]:
    torch.manual_seed(0)
    model = ConvNet().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so that folding them matters
        for name, low, high in (("running_mean", -0.5, 0.5), ("running_var", 0.5, 2.0)):
            getattr(model.bn, name).uniform_(low, high)
    return model, _export(model, torch.randn(2, 3, 16, 16))


def _so_sections(package: Path) -> dict[str, int]:
    """{section name: bytes} over the .so files of an AOTInductor package, read from the ELF headers."""
    sizes: dict[str, int] = {}
    with zipfile.ZipFile(package) as zf:
        for name in (n for n in zf.namelist() if n.endswith(".so")):
            data = zf.read(name)
            assert data[:4] == b"\x7fELF" and data[4] == 2  # 64-bit
            shoff, (shentsize, shnum, shstrndx) = (
                struct.unpack_from("<Q", data, 0x28)[0],
                struct.unpack_from("<HHH", data, 0x3A),
            )
            headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
            names = headers[shstrndx][4]
            for header in headers:
                start = names + header[0]
                section = data[start : data.index(b"\x00", start)].decode()
                sizes[section] = sizes.get(section, 0) + header[5]
    return sizes


def _calibrate(module: nn.Module) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        module(torch.randn(4, 3, 16, 16, generator=generator))


@pytest.fixture(scope="module")
def static_int8(convnet: tuple[nn.Module, torch.export.ExportedProgram]) -> QuantizedProgram:
    _, program = convnet
    return quantize_pt2e(
        program, mode="static", example_inputs=(torch.randn(2, 3, 16, 16),), calibrate=_calibrate
    )


@pytest.fixture(scope="module")
def packages(
    tmp_path_factory: pytest.TempPathFactory,
    convnet: tuple[nn.Module, torch.export.ExportedProgram],
    static_int8: QuantizedProgram,
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("aoti")
    started = time.perf_counter()
    int8 = compile_aoti(static_int8.program, out / ARTIFACT, require_int8=True)
    middle = time.perf_counter()
    fp32 = compile_aoti(convnet[1], out / "model.fp32.aoti.pt2")
    ended = time.perf_counter()
    print(f"\nAOTI compile: int8 {middle - started:.1f} s, fp32 {ended - middle:.1f} s")
    return {"int8": int8, "fp32": fp32}


# --- CPU facts and backend choice -------------------------------------------------------------------------


def test_cpu_info_parses_model_and_isa(tmp_path: Path) -> None:
    fake = tmp_path / "cpuinfo"
    fake.write_text(
        "processor\t: 0\nmodel name\t: Test Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile amx_int8\n"
        "processor\t: 1\nmodel name\t: Test Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni amx_tile amx_int8\n"
    )
    info = cpu_info(str(fake))
    assert info["model"] == "Test Xeon"
    assert info["isa"] == ["avx2", "avx512_vnni", "amx_int8", "amx_tile"]
    assert cpu_info(str(tmp_path / "missing"))["isa"] == []


def test_cpu_info_on_this_machine() -> None:
    info = cpu_info()
    assert info["model"] and info["logical_cpus"] >= 1
    flags: set[str] = set()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    assert info["isa"] == [flag for flag in ISA_FLAGS if flag in flags]


def test_supported_backends_follow_torch_and_the_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    engines = torch.backends.quantized.supported_engines
    expected = [name for name in ("fbgemm", "x86") if name in engines]
    assert supported_backends("torchscript") == expected
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "x86" not in supported_backends("pt2")
    assert supported_backends("torchscript") == expected


def test_choose_backend_fastest_wins() -> None:
    name, reason = choose_backend(
        {"fbgemm": {"int8_ms_p50": 2.0, "cosine": 0.9999}, "x86": {"int8_ms_p50": 1.0, "cosine": 0.99}}
    )
    assert name == "x86" and "fastest" in reason


def test_choose_backend_within_ten_percent_prefers_fidelity() -> None:
    candidates = {
        "fbgemm": {"int8_ms_p50": 1.0, "cosine": 0.990},
        "x86": {"int8_ms_p50": 1.08, "cosine": 0.999},
    }
    name, reason = choose_backend(candidates)
    assert name == "x86" and "more faithful" in reason
    # Equal fidelity within the tie: the faster one.
    same = {"fbgemm": {"int8_ms_p50": 1.0, "cosine": 0.99}, "x86": {"int8_ms_p50": 1.05, "cosine": 0.99}}
    assert choose_backend(same)[0] == "fbgemm"
    # Just past 10%: speed decides again.
    assert choose_backend({**candidates, "x86": {"int8_ms_p50": 1.11, "cosine": 0.999}})[0] == "fbgemm"
    # A NaN cosine never wins on fidelity.
    assert choose_backend({**candidates, "x86": {"int8_ms_p50": 1.05, "cosine": math.nan}})[0] == "fbgemm"


def test_choose_backend_refuses_bad_input() -> None:
    assert choose_backend({"fbgemm": {"int8_ms_p50": 3.0, "cosine": 0.9}})[0] == "fbgemm"
    with pytest.raises(ValueError, match="at least one"):
        choose_backend({})
    with pytest.raises(ValueError, match="latency"):
        choose_backend({"x86": {"int8_ms_p50": 0.0, "cosine": 1.0}})


# --- pt2e quantization (no compile) -----------------------------------------------------------------------


def test_strip_dead_weights_removes_unread_parameters() -> None:
    model = nn.Linear(64, 64)
    module = torch.fx.symbolic_trace(model)
    module.register_parameter("dead", nn.Parameter(torch.randn(256, 256)))
    before = state_bytes(module)
    freed = strip_dead_weights(module)
    assert freed == 256 * 256 * 4 and state_bytes(module) == before - freed
    assert torch.allclose(module(torch.ones(1, 64)), model(torch.ones(1, 64)))


@needs_pt2e
def test_static_pt2e_quantizes_conv_and_linear(
    convnet: tuple[nn.Module, torch.export.ExportedProgram], static_int8: QuantizedProgram
) -> None:
    assert sorted(static_int8.quantized) == ["conv", "fc"] and static_int8.float_layers == []
    # convert_pt2e left the fp32 weights behind; stripping them makes the int8 program smaller than fp32.
    assert static_int8.stripped_bytes > 0
    assert state_bytes(static_int8.program.module()) < state_bytes(convnet[1].module())
    model, program = convnet
    x = torch.randn(3, 3, 16, 16)  # the re-exported program keeps the dynamic batch
    with torch.no_grad():
        assert _cosine(static_int8.program.module()(x), model(x)) >= 0.98
    assert str(program.range_constraints) == str(static_int8.program.range_constraints)


@needs_pt2e
def test_exclude_keeps_layers_float_and_nothing_left_is_an_error(
    convnet: tuple[nn.Module, torch.export.ExportedProgram],
) -> None:
    example = (torch.randn(2, 3, 16, 16),)
    kept = quantize_pt2e(
        convnet[1], mode="static", example_inputs=example, calibrate=_calibrate, exclude=("fc", "nope")
    )
    assert kept.quantized == ["conv"] and kept.float_layers == ["fc"]
    assert kept.warnings == ["exclude entry 'nope' matched no layer"]
    with pytest.raises(EngineError) as caught:
        quantize_pt2e(
            convnet[1], mode="static", example_inputs=example, calibrate=_calibrate, exclude=("Conv2d", "fc")
        )
    assert caught.value.code == "nothing_quantized"


@needs_pt2e
@pytest.mark.parametrize(
    "observer, kind",
    [
        ("histogram", "HistogramObserver"),
        ("minmax", "MinMaxObserver"),
        ("moving_average", "MovingAverageMinMaxObserver"),
    ],
)
def test_the_activation_observer_asked_for_is_used(
    convnet: tuple[nn.Module, torch.export.ExportedProgram], observer: str, kind: str
) -> None:
    model, program = convnet
    seen: set[str] = set()

    def calibrate(module: nn.Module) -> None:
        seen.update(type(m).__name__ for m in module.modules() if type(m).__name__.endswith("Observer"))
        _calibrate(module)

    result = quantize_pt2e(
        program,
        mode="static",
        example_inputs=(torch.randn(2, 3, 16, 16),),
        calibrate=calibrate,
        observer=observer,
    )
    assert seen == {kind, "PerChannelMinMaxObserver"}  # activations as asked, weights per channel
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert _cosine(result.program.module()(x), model(x)) >= 0.98
    with pytest.raises(ValueError, match="observer"):
        quantize_pt2e(program, mode="static", example_inputs=(x,), calibrate=_calibrate, observer="mse")


@needs_pt2e
def test_a_single_channel_convolution_stays_float_with_a_dynamic_batch() -> None:
    """Inductor lays out the int8 output of a 1-channel convolution wrongly when the batch is dynamic."""
    torch.manual_seed(5)
    model = SmallCNN(channels=1, size=8).eval()
    example = torch.randn(2, 1, 8, 8)

    def calibrate(module: nn.Module) -> None:
        module(torch.randn(8, 1, 8, 8))

    dynamic = quantize_pt2e(
        _export(model, example), mode="static", example_inputs=(example,), calibrate=calibrate
    )
    assert dynamic.quantized == ["features.3", "head"] and dynamic.float_layers == ["features.0"]
    assert any(
        w.startswith("features.0 (a convolution with 1 input channel) is kept") for w in dynamic.warnings
    )
    # Excluded by the user: no note. With a fixed batch the int8 kernel is right: it is quantized.
    excluded = quantize_pt2e(
        _export(model, example),
        mode="static",
        example_inputs=(example,),
        calibrate=calibrate,
        exclude=("features.0",),
    )
    assert excluded.float_layers == ["features.0"] and excluded.warnings == []
    fixed = torch.export.export(model, (torch.randn(8, 1, 8, 8),))
    static = quantize_pt2e(
        fixed, mode="static", example_inputs=(torch.randn(8, 1, 8, 8),), calibrate=calibrate
    )
    assert static.quantized == ["features.0", "features.3", "head"] and static.warnings == []
    # When that convolution is all there is to quantize, the error says why.
    only = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
    with pytest.raises(EngineError) as caught:
        quantize_pt2e(_export(only, example), mode="static", example_inputs=(example,), calibrate=calibrate)
    assert caught.value.code == "nothing_quantized" and "1 input channel" in caught.value.message


@needs_pt2e
def test_per_tensor_weights_are_refused(convnet: tuple[nn.Module, torch.export.ExportedProgram]) -> None:
    with pytest.raises(EngineError) as caught:
        quantize_pt2e(
            convnet[1],
            mode="static",
            example_inputs=(torch.randn(2, 3, 16, 16),),
            calibrate=_calibrate,
            per_channel=False,
        )
    assert caught.value.code == "unsupported_combination"
    assert "Inductor compiles per-tensor int8 weights as fp32 layers" in caught.value.message


@needs_pt2e
def test_qat_pt2e_trains_and_converts(convnet: tuple[nn.Module, torch.export.ExportedProgram]) -> None:
    model, program = convnet
    generator = torch.Generator().manual_seed(2)

    def train(module: nn.Module) -> None:
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
        for _ in range(3):
            x = torch.randn(4, 3, 16, 16, generator=generator)
            with torch.no_grad():
                target = model(x)
            loss = torch.nn.functional.mse_loss(module(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    result = quantize_pt2e(
        program, mode="qat", example_inputs=(torch.randn(2, 3, 16, 16),), calibrate=_calibrate, train=train
    )
    assert sorted(result.quantized) == ["conv", "fc"]
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert _cosine(result.program.module()(x), model(x)) >= 0.98


@needs_pt2e
@pytest.mark.slow
def test_qat_keeps_excluded_and_single_channel_convolutions_float() -> None:
    """prepare_qat_pt2e's conv-bn fusion raised IndexError on a float convolution followed by a batch norm."""
    torch.manual_seed(6)
    model = SmallCNN(channels=1, size=8).eval()
    example = torch.randn(2, 1, 8, 8)

    def train(module: nn.Module) -> None:
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
        for _ in range(2):
            loss = module(torch.randn(4, 1, 8, 8)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    result = quantize_pt2e(
        _export(model, example), mode="qat", example_inputs=(example,), train=train, exclude=("features.3",)
    )
    # features.0: one input channel; features.3: excluded; both are conv-bn-relu.
    assert result.quantized == ["head"] and result.float_layers == ["features.0", "features.3"]


# --- AOTInductor packages ---------------------------------------------------------------------------------


@needs_pt2e
@pytest.mark.slow
def test_static_package_runs_int8_at_any_batch_and_checks_shapes(
    convnet: tuple[nn.Module, torch.export.ExportedProgram], packages: dict[str, Any]
) -> None:
    model = convnet[0]
    assert (int8_kernel_count(packages["int8"]) or 0) >= 2  # qconv and qlinear, not fp32 kernels
    assert int8_kernel_count(packages["fp32"]) == 0
    compiled = load_aoti(packages["int8"])
    for batch in (1, 2, 3, 16, 33):  # 16 and up: oneDNN's convolution heuristics change at 16
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            y = compiled(x)
            assert y.shape == (batch, 10)
            assert _cosine(y, model(x)) >= 0.98
    with pytest.raises(RuntimeError, match="unmatched dim value"):
        compiled(torch.randn(2, 3, 17, 16))


@needs_pt2e
@pytest.mark.slow
def test_packages_carry_no_debug_information(packages: dict[str, Any]) -> None:
    """Inductor's default -g1 put about 1.1 MB of DWARF into every .so: this int8 package was 1.6 MB."""
    for package in packages.values():
        sections = _so_sections(package)
        assert ".text" in sections
        assert not [name for name in sections if name.startswith(".debug")], sections
        assert package.stat().st_size < 700_000
    compiled = load_aoti(packages["int8"])  # still loads and runs
    with torch.no_grad():
        assert compiled(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@needs_pt2e
@pytest.mark.slow
def test_latency_int8_aoti_against_fp32(
    convnet: tuple[nn.Module, torch.export.ExportedProgram], packages: dict[str, Any]
) -> None:
    """Reported, not asserted: speed depends on the host (run with -s to see the table)."""
    model = convnet[0]
    int8, fp32 = load_aoti(packages["int8"]), load_aoti(packages["fp32"])
    rows = benchmark(
        model,
        int8,
        lambda size: torch.randn(size, 3, 16, 16),
        BenchmarkConfig(batch_sizes=(1,), threads=1, iterations=50),
        [1],
        fp32_same_build=fp32,
    )
    row = rows[0]
    print(
        f"\nbatch 1, 1 thread: fp32 eager {row['fp32_ms']['p50']} ms, fp32 AOTI {row['fp32_same_build_ms']['p50']}"
        f" ms, int8 AOTI {row['int8_ms']['p50']} ms (speedup {row['speedup']}, same build "
        f"{row['speedup_same_build']})"
    )
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        print(f"int8 AOTI fidelity at batch 8: {fidelity([model(x)], [int8(x)])}")
    assert row["int8_ms"]["p50"] > 0


@needs_pt2e
@pytest.mark.slow
def test_dynamic_pt2e_linear_compiles_to_int8(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).eval()
    program = torch.export.export(
        model, (torch.randn(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    result = quantize_pt2e(program, mode="dynamic", example_inputs=(torch.randn(2, 64),))
    assert result.quantized == ["0", "2"]
    package = compile_aoti(result.program, tmp_path / ARTIFACT, require_int8=True)
    compiled = load_aoti(package)
    for batch in (1, 5):
        x = torch.randn(batch, 64)
        with torch.no_grad():
            assert _cosine(compiled(x), model(x)) >= 0.99


@needs_pt2e
@pytest.mark.slow
def test_digits_cnn_static_on_x86_keeps_its_accuracy(digits: Digits, tmp_path: Path) -> None:
    """A real 1-channel CNN (8x8 digits): its package used to fail verification, and auto fell back to fbgemm."""
    config = StaticConfig(backend="x86", activation_observer="minmax", benchmark=FAST_BENCHMARK)
    result = quantize(digits.pt2, config, out_dir=tmp_path, calibration=digits.train, eval_data=digits.test)
    metrics = result.metrics
    assert result.backend == "x86" and result.artifacts[0].name == ARTIFACT
    accuracy = metrics["accuracy"]
    assert accuracy["fp32"] == pytest.approx(digits.accuracy, abs=0.01)
    assert abs(accuracy["int8"] - accuracy["fp32"]) <= 1.0, accuracy
    assert metrics["layers"]["quantized"] == 2 and metrics["layers"]["float"] == 1
    assert any(w.startswith("features.0 (a convolution with 1 input channel)") for w in metrics["warnings"])
    # The upload was exported from numpy's x[:, None] (stride 0 on the channel): the same-build fp32 package
    # is re-exported like the int8 one, so it takes contiguous inputs and the comparison is there.
    assert all(row["fp32_same_build_ms"]["p50"] > 0 for row in metrics["latency"])


# --- TorchScript on the x86 engine ------------------------------------------------------------------------


@pytest.mark.skipif("x86" not in torch.backends.quantized.supported_engines, reason="no x86 engine")
@pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::UserWarning"
)  # torch.ao says it is deprecated
def test_torchscript_x86_engine_round_trip(tmp_path: Path) -> None:
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    example = torch.randn(2, 3, 8, 8)
    previous = torch.backends.quantized.engine
    with set_engine("x86"):
        prepared = prepare_fx(model, default_mapping("x86"), (example,))
        for _ in range(4):
            prepared(torch.randn(4, 3, 8, 8))
        scripted = torch.jit.trace(convert_fx(prepared), example)
    assert torch.backends.quantized.engine == previous
    path = tmp_path / "model.int8.ts"
    torch.jit.save(scripted, str(path))
    loaded = load_torchscript(path, "x86")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert _cosine(loaded(x), model(x)) >= 0.98
    assert loaded.engine == "x86" and torch.backends.quantized.engine == previous
    with pytest.raises(EngineError) as caught, set_engine("no-such-engine"):
        pass
    assert caught.value.code == "unsupported_combination"
