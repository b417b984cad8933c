"""Per-layer SQNR: how far each int8 layer's output is from its float layer's, one layer at a time.

Each quantized layer is measured on its own, the way torch's numeric suite shadows a model: while the float
model runs a verification batch, each probed float layer's input is also given to its int8 counterpart
(quantized with the scale and zero point the int8 model feeds that layer), and the two outputs are compared.
The error of earlier layers does not pile up in later ones, so the worst layer is the one worth keeping in
float (`options.exclude`).

A handler sets `Int8Model.layer_probe`: a `ModuleProbe` where it keeps eager float and int8 models with the
same submodule names (torch.ao eager and FX: dynamic, static, QAT, Hugging Face), a `ProgramProbe` for a
torchao pt2e q/dq program and its float program; `outcome.finish` calls `measure_layers`. Paths that compile
their layers away before anyone can observe them (TorchScript graph mode) say so in the job's notes instead.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeGuard

import torch
from torch import nn

from workers.engine.checks.verify import SQNR_CAP_DB, Batch, call_model, flat_outputs
from workers.engine.qengine import set_engine

__all__ = [
    "GRAPH_MODE",
    "LOW_SQNR_DB",
    "MAX_BATCHES",
    "LayerProbe",
    "Measured",
    "ModuleProbe",
    "ProgramProbe",
    "fused_float",
    "low_sqnr_warnings",
    "measure_layers",
    "module_path",
    "quantized_layers",
    "unavailable",
]

MAX_BATCHES = 4  # verification batches (8 samples each) per layer: enough for a stable number, bounded time
LOW_SQNR_DB = 10.0
QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")
# The q/dq program's int8 layers (torchao's X86InductorQuantizer), by op, with the float module type each is.
WEIGHTED_OPS = {
    "aten.conv1d.default": "Conv1d",
    "aten.conv2d.default": "Conv2d",
    "aten.conv3d.default": "Conv3d",
    "aten.linear.default": "Linear",
}
NOTE_PREFIX = "per-layer SQNR"
GRAPH_MODE = (
    "TorchScript graph mode quantizes the layers inside the uploaded compiled graph, where they cannot be "
    "observed one by one (a .pt2 upload of the same model gets per-layer numbers)"
)

Row = dict[str, Any]


@dataclasses.dataclass
class Measured:
    """Per-layer rows {name, type, sqnr_db}, worst first, and the layers that could not be measured (name ->
    why)."""

    rows: list[Row]
    failures: dict[str, str] = dataclasses.field(default_factory=dict)


class LayerProbe(Protocol):
    """Something that measures per-layer SQNR on verification batches."""

    def measure(self, batches: Sequence[Batch], *, by_name: bool) -> Measured: ...


def _qparams(value: Any) -> Any:
    """The (scale, zero point, dtype) of each per-tensor quantized tensor in a layer's arguments, else None."""
    if isinstance(value, torch.Tensor):
        per_tensor = value.is_quantized and value.qscheme() in (
            torch.per_tensor_affine,
            torch.per_tensor_symmetric,
        )
        return (value.q_scale(), value.q_zero_point(), value.dtype) if per_tensor else None
    if isinstance(value, (tuple, list)):
        return tuple(_qparams(item) for item in value)
    return None


def _quantized_like(value: Any, qparams: Any) -> Any:
    """The float layer's arguments as the int8 layer takes them: quantized where its own were."""
    if isinstance(value, torch.Tensor):
        if qparams is None or not value.is_floating_point():
            return value
        scale, zero_point, dtype = qparams
        return torch.quantize_per_tensor(value, scale, zero_point, dtype)
    if isinstance(value, (tuple, list)) and isinstance(qparams, tuple) and len(value) == len(qparams):
        return type(value)(_quantized_like(v, q) for v, q in zip(value, qparams, strict=True))
    return value


def sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise), capped at SQNR_CAP_DB like verify.fidelity."""
    if noise == 0:
        return SQNR_CAP_DB
    return min(SQNR_CAP_DB, 10 * math.log10(max(signal, 1e-30) / noise))


@dataclasses.dataclass
class _Sums:
    signal: float = 0.0
    noise: float = 0.0
    calls: int = 0
    failure: str | None = None

    def add(self, reference: Any, candidate: Any) -> None:
        refs, cands = flat_outputs(reference, dequantize=True), flat_outputs(candidate, dequantize=True)
        if [t.shape for t in refs] != [t.shape for t in cands] or not refs:
            self.failure = "its int8 output differs in shape"
            return
        ref = torch.cat([t.detach().double().flatten() for t in refs])
        cand = torch.cat([t.detach().double().flatten() for t in cands])
        signal, noise = float(ref.pow(2).sum()), float((ref - cand).pow(2).sum())
        if not (math.isfinite(signal) and math.isfinite(noise)):
            self.failure = "its output is not finite"
            return
        self.signal += signal
        self.noise += noise
        self.calls += 1


@dataclasses.dataclass
class ModuleProbe:
    """Eager float and int8 models whose probed layers are submodules of the same name.

    Attributes:
        float_module: the float model, called on a batch the way the uploaded model is.
        int8_module: the int8 model before it was compiled (scripted, traced or frozen).
        layers: submodule name -> (the layer's name in the report, which options.exclude takes; the float
            module's type name).
        engine: the quantized engine the int8 weights were packed for.
    """

    float_module: nn.Module
    int8_module: nn.Module
    layers: dict[str, tuple[str, str]]
    engine: str

    def _input_qparams(
        self, modules: dict[str, nn.Module], batch: Batch, by_name: bool
    ) -> dict[str, list[Any]]:
        """Per layer and call, the quantization of the inputs the int8 model gives it (one int8 pass)."""
        seen: dict[str, list[Any]] = {name: [] for name in modules}

        def record(name: str) -> Any:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                seen[name].append(_qparams(args))

            return hook

        handles = [m.register_forward_pre_hook(record(n), with_kwargs=True) for n, m in modules.items()]
        try:
            call_model(self.int8_module, batch, by_name=by_name)
        finally:
            for handle in handles:
                handle.remove()
        return seen

    def measure(self, batches: Sequence[Batch], *, by_name: bool) -> Measured:
        """SQNR of each layer's int8 output against its float output, the layer fed the float model's input.

        Layers the float model never calls on these batches (a BERT pooler under the last hidden state) have
        no number and are left out; layers whose int8 counterpart fails are listed in `failures`.
        """
        floats = dict(self.float_module.named_modules())
        int8s = dict(self.int8_module.named_modules())
        names = [n for n in self.layers if n in floats and n in int8s]
        sums = {name: _Sums() for name in names}
        calls: dict[str, int] = {}
        with set_engine(self.engine), torch.no_grad():
            qparams = self._input_qparams({n: int8s[n] for n in names}, batches[0], by_name)

            def shadow(name: str) -> Any:
                def hook(
                    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
                ) -> None:
                    index, recorded = calls.get(name, 0), qparams[name]
                    calls[name] = index + 1
                    if sums[name].failure is not None:
                        return
                    inputs = _quantized_like(args, recorded[index % len(recorded)] if recorded else None)
                    try:
                        sums[name].add(output, int8s[name](*inputs, **kwargs))
                    except Exception as exc:  # this layer's number is lost, not the job
                        sums[name].failure = f"{type(exc).__name__}: {exc}"

                return hook

            handles = [floats[n].register_forward_hook(shadow(n), with_kwargs=True) for n in names]
            try:
                for batch in batches:
                    calls.clear()
                    call_model(self.float_module, batch, by_name=by_name)
            finally:
                for handle in handles:
                    handle.remove()
        return _measured((self.layers[n], s) for n, s in sums.items())


def _measured(sums: Iterable[tuple[tuple[str, str], _Sums]]) -> Measured:
    """Rows worst first from the sums of each (name, type) layer, merged where several calls or weights share
    a name (a module called twice: excluding the name keeps them all float); failed layers apart, layers
    that never ran left out."""
    merged: dict[tuple[str, str], _Sums] = {}
    failures: dict[str, str] = {}
    for (name, type_name), part in sums:
        if part.failure is not None:
            failures[name] = part.failure
            continue
        total = merged.setdefault((name, type_name), _Sums())
        total.signal, total.noise, total.calls = (
            total.signal + part.signal,
            total.noise + part.noise,
            total.calls + part.calls,
        )
    rows = [
        {"name": name, "type": type_name, "sqnr_db": round(sqnr_db(s.signal, s.noise), 3)}
        for (name, type_name), s in merged.items()
        if s.calls and name not in failures
    ]
    return Measured(sorted(rows, key=lambda row: (row["sqnr_db"], row["name"])), failures)


def module_path(node: torch.fx.Node) -> tuple[str, str]:
    """(innermost module path, its class name) of a graph node, ("", "") for the root's own ops."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return "", ""
    path, cls = stack[-1]
    name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return str(path).removeprefix("L['self']."), name.rsplit(".", 1)[-1]


def _weighted_nodes(graph: torch.fx.Graph) -> dict[tuple[str, str, int], torch.fx.Node]:
    """Conv and linear calls by (module path, op, occurrence): how a float and a q/dq program's layers pair."""
    found: dict[tuple[str, str, int], torch.fx.Node] = {}
    seen: dict[tuple[str, str], int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) in WEIGHTED_OPS:
            key = (module_path(node)[0], str(node.target))
            found[(*key, seen.get(key, 0))] = node
            seen[key] = seen.get(key, 0) + 1
    return found


def _is_quant_op(node: Any) -> TypeGuard[torch.fx.Node]:
    """Whether a graph argument is a torchao quantize/dequantize/choose_qparams call (or an item of one)."""
    return isinstance(node, torch.fx.Node) and (
        str(node.target).startswith("quantized_decomposed.")
        or (node.target is operator.getitem and _is_quant_op(node.args[0]))
    )


def _attr(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


class _Shadow:
    """One q/dq program layer as a function of its float input: the activation's quantize/dequantize chain
    (static scale or computed per batch), the dequantized int8 weight, the conv or linear call."""

    def __init__(self, module: nn.Module, node: torch.fx.Node) -> None:
        source = node.args[0]
        while _is_quant_op(source):
            source = source.args[0]
        self.module, self.node, self.source = module, node, source

    def __call__(self, value: torch.Tensor) -> Any:
        memo: dict[torch.fx.Node, Any] = {}

        def evaluate(node: torch.fx.Node) -> Any:
            if node is self.source:
                return value
            if node not in memo:
                if node.op == "get_attr":
                    memo[node] = _attr(self.module, str(node.target))
                elif node.op == "call_function" and callable(node.target):
                    args = torch.fx.node.map_arg(node.args, evaluate)
                    kwargs = torch.fx.node.map_arg(node.kwargs, evaluate)
                    memo[node] = node.target(*args, **kwargs)
                else:  # the layer depends on more than its input: no shadow for it
                    raise ValueError(f"{node.format_node()} is not a constant of the layer")
            return memo[node]

        return evaluate(self.node)


def _folded_norm(float_node: torch.fx.Node, int8_node: torch.fx.Node) -> torch.fx.Node | None:
    """The batch norm after a float convolution that the q/dq program folded into its convolution (pt2e folds
    them before quantizing): the float output to compare with is the norm's."""
    users = list(float_node.users)
    if len(users) != 1 or "batch_norm" not in str(users[0].target):
        return None
    if any("batch_norm" in str(user.target) for user in int8_node.users):
        return None  # the q/dq program kept its norm: compare the convolutions themselves
    norm = users[0]
    if "native_batch_norm" in str(norm.target):  # (out, mean, var): the output is item 0
        items = [u for u in norm.users if u.target is operator.getitem and u.args[1] == 0]
        return items[0] if len(items) == 1 else None
    return norm


@dataclasses.dataclass
class ProgramProbe:
    """A float program and its q/dq int8 program (torchao pt2e), paired by the module path of their conv and
    linear calls; each int8 layer is run on the float layer's input (its own q/dq chain applied).

    Attributes:
        float_module: the float program's module (`ExportedProgram.module()`), called positionally.
        int8_module: the q/dq program's module, before it is compiled.
    """

    float_module: torch.fx.GraphModule
    int8_module: torch.fx.GraphModule

    def measure(self, batches: Sequence[Batch], *, by_name: bool) -> Measured:
        """SQNR of each q/dq layer's output against the float layer's (after a batch norm the q/dq program
        folded into it), the layer fed the float model's input."""
        floats = _weighted_nodes(self.float_module.graph)
        int8s = _weighted_nodes(self.int8_module.graph)
        pairs = {floats[k]: int8s[k] for k in floats.keys() & int8s.keys() if _is_quant_op(int8s[k].args[1])}
        labels = {
            f: (k[0] or f.name, module_path(f)[1] or WEIGHTED_OPS[k[1]])
            for k, f in floats.items()
            if f in pairs
        }
        shadows = {f: _Shadow(self.int8_module, q) for f, q in pairs.items()}
        compare_at = {(_folded_norm(f, q) or f): f for f, q in pairs.items()}
        sums = {f: _Sums() for f in pairs}
        pending: dict[torch.fx.Node, Any] = {}

        class Probe(torch.fx.Interpreter):
            def run_node(self, node: torch.fx.Node) -> Any:
                result = super().run_node(node)
                if node in shadows and sums[node].failure is None:
                    try:
                        pending[node] = shadows[node](self.env[node.args[0]])  # type: ignore[index]
                    except Exception as exc:  # this layer's number is lost, not the job
                        sums[node].failure = f"{type(exc).__name__}: {exc}"
                layer = compare_at.get(node)
                if layer is not None and layer in pending:
                    sums[layer].add(result, pending.pop(layer))
                return result

        with torch.no_grad():
            for batch in batches:
                Probe(self.float_module).run(*batch.values())
        return _measured((labels[f], s) for f, s in sums.items())


def quantized_layers(
    int8_module: nn.Module, candidates: Mapping[str, tuple[str, str]]
) -> dict[str, tuple[str, str]]:
    """The candidates (submodule name -> (path, type name)) that became torch.ao quantized modules, named by
    their path (the submodule name where the layer had none)."""
    modules = dict(int8_module.named_modules())
    return {
        name: (path or name, type_name)
        for name, (path, type_name) in candidates.items()
        if name in modules and type(modules[name]).__module__.startswith(QUANTIZED_MODULES)
    }


def fused_float(module: nn.Module) -> nn.Module:
    """A copy of an FX-quantizable float module with conv+bn(+relu) and linear+relu fused the way prepare_fx
    fuses them, so that each fused group is one submodule named like its int8 module."""
    from torch.ao.quantization.quantize_fx import fuse_fx

    return fuse_fx(copy.deepcopy(module).eval())


def low_sqnr_warnings(rows: Sequence[Row]) -> list[str]:
    """A warning for each layer under LOW_SQNR_DB, naming the exclude option that keeps it in float."""
    return [
        f"layer {row['name']} ({row['type']}) has {row['sqnr_db']:.1f} dB SQNR: "
        f"consider options.exclude=['{row['name']}']"
        for row in rows
        if row["sqnr_db"] < LOW_SQNR_DB
    ]


def unavailable(why: str) -> str:
    """The note for a path that gives no per-layer numbers."""
    return f"{NOTE_PREFIX} is not available: {why}"


def measure_layers(
    probe: LayerProbe | None, batches: Sequence[Batch], *, by_name: bool, notes: list[str]
) -> list[Row]:
    """metrics["layers"]["per_layer"]: per-layer SQNR on the first MAX_BATCHES verification batches, worst
    first, with a warning in `notes` for each layer under LOW_SQNR_DB.

    Without a probe the list is empty and `notes` says so (the handler's own reason when it gave one). A probe
    that fails costs the list, never the job.
    """
    if probe is None:
        if not any(note.startswith(NOTE_PREFIX) for note in notes):
            notes.append(unavailable("this backend does not expose its int8 layers one by one"))
        return []
    try:
        measured = probe.measure(list(batches[:MAX_BATCHES]), by_name=by_name)
    except Exception as exc:
        notes.append(f"{NOTE_PREFIX} could not be measured ({type(exc).__name__}: {exc})")
        return []
    if measured.failures:
        names = ", ".join(sorted(measured.failures))
        why = next(iter(measured.failures.values()))
        notes.append(f"{NOTE_PREFIX} could not be measured for {names} ({why})")
    notes.extend(low_sqnr_warnings(measured.rows))
    return measured.rows
