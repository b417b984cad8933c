"""Hostile `.pt2` archives: what torch.export.load would run from the file is refused before it loads.

Every archive here is a real torch.export.save'd program rewritten with zipfile, the way torch 2.13's reader
resolves names: case-insensitively (miniz), and `os.path.join(folder, path_name)` so that an absolute
path_name drops the folder (`<root>//evil`). The payloads write a canary file outside the job's folder when
torch unpickles (or sympifies) them; the engine tests call the checks only, the runner tests run the worker's
sandboxed runner end to end.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections import namedtuple
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from workers.engine.errors import EngineError
from workers.engine.inputs.archive import detect_model_format
from workers.engine.inputs.data import inspect_dataset
from workers.engine.inputs.io import load_model
from workers.engine.inputs.pt2_checks import check_pt2_payloads
from workers.supervise import run_runner

DEEP = 100_000
SYMBOL = "Symbol('s77', positive=True, integer=True)"


class Program(nn.Module):
    """Parameters, buffers (persistent and not), a BatchNorm counter and a lifted tensor constant."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.register_buffer("scale", torch.ones(2))
        self.register_buffer("offset", torch.full((2,), 3.0), persistent=False)
        self.bias = torch.tensor([1.0, 2.0])  # a plain tensor attribute: exported as a lifted constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).mean((2, 3))
        return self.fc(y) * self.scale + self.offset + self.bias


@pytest.fixture(scope="session")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pt2-hostile") / "model.pt2"
    batch = torch.export.Dim("batch")
    ep = torch.export.export(Program().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(ep, str(path))
    return path


class Canary:
    """Unpickled with weights_only=False: writes the canary, then is conv.weight, so the program loads fine."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, ...]:
        code = (
            f"open({self.path!r}, 'w').close() or "
            "__import__('torch').nn.Parameter(__import__('torch').zeros(4, 3, 3, 3))"
        )
        return (eval, (code,))


def pickled_canary(canary: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save(Canary(canary), buffer)
    return buffer.getvalue()


@dataclass
class Archive:
    """A program's entries, to rewrite: names are below the root folder (`data/weights/weight_0`)."""

    root: str
    entries: dict[str, bytes]
    renamed: dict[str, str] = field(default_factory=dict)

    def json(self, name: str) -> dict:
        return json.loads(self.entries[name])

    def set_json(self, name: str, content: object) -> None:
        self.entries[name] = json.dumps(content).encode()

    def payload_meta(self, config: str, fqn: str, **changes: object) -> None:
        content = self.json(config)
        content["config"][fqn].update(changes)
        self.set_json(config, content)

    def write(self, path: Path) -> Path:
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in self.entries.items():
                zf.writestr(f"{self.root}/{self.renamed.get(name, name)}", data)
        return path


WEIGHTS = "data/weights/model_weights_config.json"
CONSTANTS = "data/constants/model_constants_config.json"
PROGRAM = "models/model.json"


def read_archive(path: Path) -> Archive:
    with zipfile.ZipFile(path) as zf:
        root = zf.namelist()[0].split("/", 1)[0]
        return Archive(root, {i.filename[len(root) + 1 :]: zf.read(i) for i in zf.infolist()})


def case_insensitive_payload_name(a: Archive, canary: Path) -> None:
    # torch finds data/weights/weight_evil for WEIGHT_EVIL; the old check looked for the exact name only.
    a.payload_meta(WEIGHTS, "conv.weight", use_pickle=True, path_name="WEIGHT_EVIL")
    a.entries["data/weights/weight_evil"] = pickled_canary(canary)


def names_differing_only_in_case(a: Archive, canary: Path) -> None:
    a.entries["data/weights/WEIGHT_0"] = a.entries["data/weights/weight_0"]


def absolute_path_name(a: Archive, canary: Path) -> None:
    # os.path.join("data/weights/", "/evil") is "/evil": torch reads the entry <root>//evil.
    a.payload_meta(WEIGHTS, "conv.weight", use_pickle=True, path_name="/evil")
    a.entries["/evil"] = pickled_canary(canary)


def payload_in_a_real_weight(a: Archive, canary: Path) -> None:
    # The weight itself is the payload, named in another case: the program loads and runs it every job.
    a.payload_meta(WEIGHTS, "conv.weight", use_pickle=True, path_name="WEIGHT_0")
    a.entries["data/weights/weight_0"] = pickled_canary(canary)


def payload_in_a_real_weight_by_its_name(a: Archive, canary: Path) -> None:
    a.payload_meta(WEIGHTS, "conv.weight", use_pickle=True)
    a.entries["data/weights/weight_0"] = pickled_canary(canary)


def truthy_use_pickle(a: Archive, canary: Path) -> None:
    a.payload_meta(WEIGHTS, "conv.weight", use_pickle="no")
    a.entries["data/weights/weight_0"] = pickled_canary(canary)


def pickled_constant_in_another_case(a: Archive, canary: Path) -> None:
    a.payload_meta(CONSTANTS, "bias", use_pickle=True, path_name="TENSOR_EVIL")
    a.entries["data/constants/tensor_evil"] = pickled_canary(canary)


def opaque_object_constant(a: Archive, canary: Path) -> None:
    a.payload_meta(CONSTANTS, "bias", use_pickle=True, path_name="opaque_obj_0", tensor_meta=None)
    a.entries["data/constants/opaque_obj_0"] = pickled_canary(canary)


def sample_inputs_in_another_case(a: Archive, canary: Path) -> None:
    a.entries["data/sample_inputs/model.pt"] = pickled_canary(canary)
    a.renamed["data/sample_inputs/model.pt"] = "data/Sample_Inputs/model.pt"


def pickled_sample_inputs(a: Archive, canary: Path) -> None:
    a.entries["data/sample_inputs/model.pt"] = pickled_canary(canary)


def legacy_weights_file(a: Archive, canary: Path) -> None:
    a.entries["data/weights/model.pt"] = pickled_canary(canary)


def program_named_outside_models_json(a: Archive, canary: Path) -> None:
    # torch takes every record under models/ as a program: "models/evilXjson" is the program "evil".
    a.entries["models/evilXjson"] = a.entries[PROGRAM]
    a.entries["data/sample_inputs/evil.pt"] = a.entries["data/sample_inputs/model.pt"]
    a.entries["data/constants/evil_constants_config.json"] = a.entries[CONSTANTS]
    a.entries["data/weights/evil_weights_config.json"] = a.entries[WEIGHTS]
    a.entries["data/weights/weight_evil"] = pickled_canary(canary)
    config = a.json(WEIGHTS)
    config["config"]["conv.weight"].update(use_pickle=True, path_name="weight_evil")
    a.set_json("data/weights/evil_weights_config.json", config)


def code_in_a_symbolic_shape(a: Archive, canary: Path) -> None:
    # torch passes expr_str to sympy.sympify, which evaluates it as Python.
    text = a.entries[PROGRAM].decode()
    symbol = json.dumps(SYMBOL)
    assert symbol in text
    evil = f"{SYMBOL} if open({str(canary)!r}, 'w').close() is None else 0"
    a.entries[PROGRAM] = text.replace(symbol, json.dumps(evil)).encode()


def module_import_in_a_pytree_spec(a: Archive, canary: Path) -> None:
    # An "__enum__" key in a pytree context makes torch import the module it names.
    program = a.json(PROGRAM)
    signature = program["graph_module"]["module_call_graph"][0]["signature"]
    spec = json.loads(signature["in_spec"])
    spec[1]["children_spec"][1]["context"] = json.dumps([{"__enum__": True, "fqn": "this:s", "name": "x"}])
    signature["in_spec"] = json.dumps(spec)
    a.set_json(PROGRAM, program)


def code_in_a_guard(a: Archive, canary: Path) -> None:
    # torch pastes guards_code into a function it compiles with exec and runs on every call of the module.
    program = a.json(PROGRAM)
    program["guards_code"] = [f"open({str(canary)!r}, 'w').close() is None"]
    a.set_json(PROGRAM, program)


def code_as_a_graph_node_target(a: Archive, canary: Path) -> None:
    # torch looks a node's target up by attribute path under torch, operator or math and calls it.
    program = a.json(PROGRAM)
    program["verifiers"] = []  # the verifier is torch's own, and the file says which to run
    node = program["graph_module"]["graph"]["nodes"][-1]
    node["target"] = "torch.os.system"
    node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {canary}"}, "kind": 1}]
    a.set_json(PROGRAM, program)


def an_operator_namespace_that_is_not_one(a: Archive, canary: Path) -> None:
    program = a.json(PROGRAM)
    program["graph_module"]["graph"]["nodes"][-1]["target"] = "torch.ops.load_library.default"
    a.set_json(PROGRAM, program)


def deeply_nested_weights_config(a: Archive, canary: Path) -> None:
    a.entries[WEIGHTS] = b"[" * DEEP + b"]" * DEEP


def weights_config_not_a_mapping(a: Archive, canary: Path) -> None:
    a.set_json(WEIGHTS, {"config": [1, 2]})


HOSTILE: dict[Callable[[Archive, Path], None], str] = {
    case_insensitive_payload_name: "pickle_not_allowed",
    names_differing_only_in_case: "not_a_model",
    absolute_path_name: "not_a_model",
    payload_in_a_real_weight: "pickle_not_allowed",
    payload_in_a_real_weight_by_its_name: "pickle_not_allowed",
    truthy_use_pickle: "pickle_not_allowed",
    pickled_constant_in_another_case: "pickle_not_allowed",
    opaque_object_constant: "pickle_not_allowed",
    sample_inputs_in_another_case: "not_a_model",
    pickled_sample_inputs: "pickle_not_allowed",
    legacy_weights_file: "pickle_not_allowed",
    program_named_outside_models_json: "not_a_model",
    code_in_a_symbolic_shape: "not_a_model",
    module_import_in_a_pytree_spec: "unsupported_format",
    deeply_nested_weights_config: "not_a_model",
    weights_config_not_a_mapping: "not_a_model",
    code_in_a_guard: "not_a_model",
    code_as_a_graph_node_target: "unsupported_format",
    an_operator_namespace_that_is_not_one: "unsupported_format",
}


def hostile(program: Path, build: Callable[[Archive, Path], None], folder: Path, canary: Path) -> Path:
    archive = read_archive(program)
    build(archive, canary)
    return archive.write(folder / "model.pt2")


def refusal(path: Path) -> EngineError:
    """What the worker does before torch.export.load: detect the format, then check the payloads."""
    with pytest.raises(EngineError) as info:
        assert detect_model_format(path) == "pt2"
        check_pt2_payloads(path)
    return info.value


@pytest.mark.parametrize("build", list(HOSTILE), ids=lambda build: build.__name__)
def test_hostile_programs_are_refused_before_torch_reads_them(
    program: Path, build: Callable[[Archive, Path], None], tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    job = tmp_path / "job"
    job.mkdir()
    error = refusal(hostile(program, build, job, canary))
    assert error.code == HOSTILE[build], error.message
    assert "re-" in error.message or "use str keys" in error.message  # says what to do instead
    assert not canary.exists()


def test_a_saved_program_with_buffers_and_constants_passes_and_loads(program: Path) -> None:
    archive = read_archive(program)
    constants = archive.json(CONSTANTS)["config"]
    assert {"bias", "offset"} <= set(constants)  # the lifted constant and the non-persistent buffer
    metas = [*archive.json(WEIGHTS)["config"].values(), *constants.values()]
    assert all(meta["use_pickle"] is False for meta in metas)  # torch.export.save pickles no plain tensor
    assert detect_model_format(program) == "pt2"
    check_pt2_payloads(program)
    loaded = load_model(program)
    assert loaded.info.inputs[0].shape == [None, 3, 8, 8]
    assert loaded.module(torch.randn(3, 3, 8, 8)).shape == (3, 2)


def test_a_program_with_symbolic_shapes_and_runtime_checks_passes(tmp_path: Path) -> None:
    class Reshapes(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            n = y.sum().int().item()
            torch._check(n >= 0)
            torch._check(n < 10)
            return x.reshape(x.shape[0] // 2, -1).sum() + torch.zeros(n).sum() + y[: x.shape[0] // 2].sum()

    half, batch = torch.export.Dim("half"), torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(
        Reshapes(), (torch.randn(4, 8), torch.ones(6)), dynamic_shapes={"x": {0: 2 * half}, "y": {0: batch}}
    )
    path = tmp_path / "reshapes.pt2"
    torch.export.save(ep, str(path))
    assert detect_model_format(path) == "pt2"
    check_pt2_payloads(path)


Pair = namedtuple("Pair", ["high", "low"])


def test_a_program_with_dict_and_namedtuple_inputs_and_outputs_passes(tmp_path: Path) -> None:
    from torch.utils import _pytree as pytree

    if Pair not in pytree.SUPPORTED_NODES:  # a namedtuple output needs a serialized name to be saved
        pytree._register_namedtuple(Pair, serialized_type_name="tests.engine.test_pt2_hostile.Pair")

    class Structured(nn.Module):
        def forward(self, x: torch.Tensor, extra: dict[str, torch.Tensor]) -> tuple[Pair, dict]:
            return Pair(x.max(), x.min()), {"sum": x.sum() + extra["a"].sum()}

    ep = torch.export.export(Structured(), (torch.randn(2, 3), {"a": torch.ones(2)}))
    path = tmp_path / "structured.pt2"
    torch.export.save(ep, str(path))
    assert detect_model_format(path) == "pt2"
    check_pt2_payloads(path)


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    """Uploads and a job folder shaped like the service's (see tests/workers/test_sandbox.py)."""
    tmp_path.chmod(0o755)
    data = tmp_path / "var"
    work = data / "work" / "job-1"
    work.mkdir(parents=True)
    for directory in (data, data / "work"):
        directory.chmod(0o777)
    uploads = data / "uploads"
    uploads.mkdir()
    return uploads, work


RUNNER_CASES = [
    case_insensitive_payload_name,
    absolute_path_name,
    payload_in_a_real_weight,
    code_in_a_symbolic_shape,
]


@pytest.mark.slow
@pytest.mark.parametrize("build", RUNNER_CASES, ids=lambda build: build.__name__)
def test_the_runner_refuses_hostile_programs(
    program: Path, build: Callable[[Archive, Path], None], layout: tuple[Path, Path], tmp_path: Path
) -> None:
    uploads, work = layout
    canary = tmp_path / "canary"
    path = hostile(program, build, uploads, canary)
    outcome = run_runner(
        ["inspect-model", "--file", str(path), "--out", str(work / "out")], work_dir=work, timeout_s=120
    )
    assert outcome.result is None, outcome
    assert outcome.error_code == HOSTILE[build], outcome
    assert not canary.exists()


def hf_zip(path: Path, entries: dict[str, bytes]) -> Path:
    from safetensors.torch import save

    files = {"model.safetensors": save({"w": torch.zeros(2)}), **entries}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


BERT = json.dumps({"model_type": "bert"}).encode()


@pytest.mark.parametrize(
    "entries",
    [
        {"config.json": b"[" * DEEP + b"]" * DEEP},
        {"config.json": BERT, "tokenizer_config.json": b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"},
        {"config.json": BERT, "tokenizer_config.json": b"[]"},
        {"config.json": BERT, "model.safetensors.index.json": b"[1]"},
    ],
    ids=["deep_config", "deep_tokenizer_config", "list_tokenizer_config", "list_index"],
)
def test_malformed_hugging_face_json_is_not_a_model(entries: dict[str, bytes], tmp_path: Path) -> None:
    with pytest.raises(EngineError) as info:
        detect_model_format(hf_zip(tmp_path / "model.zip", entries))
    assert info.value.code == "not_a_model"


def test_a_deeply_nested_safetensors_header_is_not_a_dataset(tmp_path: Path) -> None:
    header = b'{"a": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    path = tmp_path / "data.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(EngineError) as info:
        inspect_dataset(path)
    assert info.value.code == "unsupported_format"


def test_guards_and_targets_that_export_writes_pass() -> None:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    from workers.engine.inputs.pt2_checks import GUARD_NAMES, _safe_guard, _safe_target

    names = GUARD_NAMES | frozenset(SYMPY_INTERP)
    for guard in ("L['y'].size()[0] <= L['x'].size()[0]", "L['x'].stride()[1] == 1", "math.isnan(L['f'])"):
        assert _safe_guard(guard, names), guard
    for guard in ("__import__('os')", "L['x'].__class__", "(lambda: 0)()", "L['x'].size(dim=0) == 2"):
        assert not _safe_guard(guard, names), guard
    for target in ("torch.ops.aten.linear.default", "torch.ops.higher_order.cond", "_operator.getitem"):
        assert _safe_target(target), target
    for target in ("torch.os.system", "torch.ops.aten.__call__", "builtins.eval", "#custom", "torch.load"):
        assert not _safe_target(target), target


def test_guards_in_a_program_with_dynamic_shapes_pass(tmp_path: Path) -> None:
    """A program whose export wrote guards (two dynamic dimensions related by a slice) still passes."""

    class Sliced(torch.nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return x[: y.shape[0]] * 2

    dims = {"x": {0: torch.export.Dim("b", min=2, max=64)}, "y": {0: torch.export.Dim("c", max=8)}}
    program = torch.export.export(Sliced(), (torch.randn(8, 4), torch.randn(3, 4)), dynamic_shapes=dims)
    assert program._guards_code  # what this test is about
    path = tmp_path / "guarded.pt2"
    torch.export.save(program, path)
    check_pt2_payloads(path)
