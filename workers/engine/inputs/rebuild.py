"""Turn the aten calls of a torch.export program back into nn modules that torch.ao can quantize.

`ep.module()` holds `aten.linear` calls on parameters, not `nn.Linear` modules, so `quantize_dynamic` and FX
quantization find nothing in it. This pass replaces each `aten.linear` (and its decomposed `addmm`/`mm` form),
`aten.lstm`, `aten.gru` and, on request, `aten.embedding` whose weights are parameters by a call to a fresh
module holding those same tensors, and switches the graph to plain positional code so that TorchScript can
compile it. For static quantization it also rebuilds convolutions, eval-mode batch norms and ReLUs as modules
(so that FX fuses conv+bn+relu) and turns a few aten calls into the torch functions FX knows (pooling,
flatten, add, cat…), so that quantized tensors flow through them instead of being dequantized.
"""

from __future__ import annotations

import keyword
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeGuard, TypeVar

import torch
from torch import nn
from torch.fx.graph import CodeGen
from torch.fx.node import Argument

__all__ = ["RebuiltModel", "rebuild_modules"]

aten = torch.ops.aten
T = TypeVar("T")
F = nn.functional
TRANSPOSES = (aten.permute.default, aten.t.default)
CONVOLUTIONS: dict[int, type[nn.Module]] = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}  # by weight rank
BATCH_NORMS: dict[int, type[nn.Module]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # fmt: skip
# aten calls whose positional arguments mean the same in the torch function FX quantization matches.
FUNCTIONS: dict[Any, Callable[..., Any]] = {
    aten.max_pool2d.default: F.max_pool2d,
    aten.avg_pool2d.default: F.avg_pool2d,
    aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
    aten.flatten.using_ints: torch.flatten,
    aten.add.Tensor: torch.add,
    aten.mul.Tensor: torch.mul,
    aten.cat.default: torch.cat,
    aten.mean.dim: torch.mean,
    aten.hardtanh.default: F.hardtanh,
    aten.hardswish.default: F.hardswish,
    aten.sigmoid.default: torch.sigmoid,
    aten.tanh.default: torch.tanh,
    # Quantized convolutions return channels-last tensors, on which a decomposed program's `view` fails.
    aten.view.default: torch.reshape,
    aten._unsafe_view.default: torch.reshape,
}


@dataclass
class RebuiltModel:
    """The float model with modules put back: `layers` maps module name to (original path, type name)."""

    module: torch.fx.GraphModule
    layers: dict[str, tuple[str, str]] = field(default_factory=dict)
    float_weights: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)


def _attr(gm: torch.fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _param(tensor: torch.Tensor) -> nn.Parameter:
    return tensor if isinstance(tensor, nn.Parameter) else nn.Parameter(tensor.detach(), requires_grad=False)


def _nodes(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """A snapshot of the graph's nodes, typed (Graph.nodes is not)."""
    return list(graph.nodes)


def _is_attr(arg: Argument) -> TypeGuard[torch.fx.Node]:
    """Whether an argument is a `get_attr` node, i.e. a parameter or buffer of the module."""
    return isinstance(arg, torch.fx.Node) and arg.op == "get_attr"


def _arg(node: torch.fx.Node, i: int, kind: type[T]) -> T:
    """Argument i of node, of the type the op's schema gives it (a graph node for a tensor, a bool, an int)."""
    arg = node.args[i]
    if not isinstance(arg, kind) or (kind is int and isinstance(arg, bool)):
        raise TypeError(
            f"{node.format_node()}: argument {i} should be {kind.__name__}, not {type(arg).__name__}"
        )
    return arg


def _list_arg(node: torch.fx.Node, i: int) -> list[Argument]:
    """Argument i of node, which the op's schema makes a list (Tensor[], int[])."""
    arg = node.args[i]
    if not isinstance(arg, (list, tuple)):
        raise TypeError(f"{node.format_node()}: argument {i} should be a list, not {type(arg).__name__}")
    return list(arg)


def _innermost_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(p) for p, _ in stack.values() if p and not str(p).startswith("_empty")]
    return paths[-1] if paths else ""


class _Rebuilder:
    def __init__(self, gm: torch.fx.GraphModule, embeddings: bool, static: bool) -> None:
        self.gm = gm
        self.graph = gm.graph
        self.embeddings = embeddings
        self.static = static
        self.modules: dict[str, nn.Module] = {}  # temporary name -> module
        self.origin: dict[str, tuple[str, str]] = {}  # temporary name -> (path, type)
        self.by_weight: dict[tuple[str, ...], str] = {}  # weight targets -> temporary name (shared layers)

    def _add(
        self, node: torch.fx.Node, key: tuple[str, ...], make: Callable[[], nn.Module], type_name: str
    ) -> str:
        if key not in self.by_weight:
            temp = f"__qaas_layer_{len(self.modules)}"
            self.modules[temp] = make()
            self.gm.add_submodule(temp, self.modules[temp])  # call_module checks that the target exists
            self.origin[temp] = (_innermost_path(node), type_name)
            self.by_weight[key] = temp
        return self.by_weight[key]

    def _swap(
        self, node: torch.fx.Node, key: tuple[str, ...], make: Callable[[], nn.Module], type_name: str,
        args: tuple[Argument, ...], replaced: torch.fx.Node | None = None,
    ) -> None:  # fmt: skip
        """Call the module (built once per key) instead of node; `replaced` is the node whose uses move."""
        name = self._add(node, key, make, type_name)
        with self.graph.inserting_before(node):
            call = self.graph.call_module(name, args)
        call.meta = dict(node.meta)
        (replaced or node).replace_all_uses_with(call)
        if replaced is not None:
            self.graph.erase_node(replaced)
        self.graph.erase_node(node)

    def _linear(self, node: torch.fx.Node, x: Argument, w: torch.fx.Node, b: torch.fx.Node | None) -> None:
        weight = _attr(self.gm, str(w.target))
        bias = _attr(self.gm, str(b.target)) if b is not None else None
        if weight.dim() != 2 or (bias is not None and bias.shape != weight.shape[:1]):
            return

        def make() -> nn.Module:
            lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            lin.weight = _param(weight)
            if bias is not None:
                lin.bias = _param(bias)
            return lin

        key = ("linear", str(w.target), str(b.target) if b is not None else "")
        self._swap(node, key, make, "Linear", (x,))

    def _conv(self, node: torch.fx.Node, args: list[Argument]) -> None:
        # aten.conv{1,2,3}d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1) with every default
        # filled in; the decomposed aten.convolution carries the same numbers.
        x, w, b, stride, padding, dilation, groups = args
        if not _is_attr(w) or not (b is None or _is_attr(b)):
            return
        weight = _attr(self.gm, str(w.target))
        bias = _attr(self.gm, str(b.target)) if b is not None else None
        cls = CONVOLUTIONS.get(weight.dim())
        if cls is None or not isinstance(groups, int):
            return
        rank = weight.dim() - 2

        def spread(value: Any) -> tuple[int, ...]:  # [k] or [k, k] or k -> (k, k)
            return (
                tuple(value) * (rank // len(value)) if isinstance(value, (list, tuple)) else (value,) * rank
            )

        def make() -> nn.Module:
            conv = cls(
                weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=spread(stride),
                padding=spread(padding), dilation=spread(dilation), groups=groups, bias=bias is not None,
            )  # fmt: skip
            conv.weight = _param(weight)
            if bias is not None:
                conv.bias = _param(bias)
            return conv.eval()

        key = ("conv", str(w.target), str(b.target) if b is not None else "")
        self._swap(node, key, make, cls.__name__, (x,))

    def _batch_norm(self, node: torch.fx.Node, replaced: torch.fx.Node | None) -> None:
        # batch_norm(x, w, b, mean, var, training, momentum, eps, cudnn) and its decomposed form
        # _native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps)[0]
        x, w, b, mean, var = node.args[:5]
        momentum, eps = node.args[6:8] if node.target == aten.batch_norm.default else node.args[5:7]
        value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        cls = BATCH_NORMS.get(value.dim()) if isinstance(value, torch.Tensor) else None
        affine = _is_attr(w) and _is_attr(b)
        if cls is None or not (_is_attr(mean) and _is_attr(var)) or not (affine or w is b is None):
            return
        if node.target == aten.batch_norm.default and node.args[5] is not False:
            return  # training-mode statistics: not the eval-mode layer this pass rebuilds
        tensors = [_attr(self.gm, str(a.target)) for a in (w, b, mean, var) if _is_attr(a)]

        def make() -> nn.Module:
            norm = cls(tensors[-1].shape[0], eps=eps, momentum=momentum, affine=affine)
            if affine:
                norm.weight, norm.bias = _param(tensors[0]), _param(tensors[1])
            norm.running_mean, norm.running_var = tensors[-2], tensors[-1]
            return norm.eval()

        key = ("batch_norm", *(str(a.target) for a in (w, b, mean, var) if _is_attr(a)))
        self._swap(node, key, make, cls.__name__, (x,), replaced)

    def _static_ops(self, node: torch.fx.Node) -> None:
        args: list[Any] = list(node.args)
        target = node.target
        if target in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default) and not node.kwargs:
            self._conv(node, args + [None, 1, 0, 1, 1][len(args) - 2 :])
        elif target == aten.convolution.default and not node.kwargs and args[6] is False:
            self._conv(node, args[:6] + args[8:9])
        elif target == aten.batch_norm.default:
            self._batch_norm(node, None)
        elif target == aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if len(users) == 1 and users[0].target is operator.getitem and users[0].args[1] == 0:
                self._batch_norm(node, users[0])
        elif target == aten.relu.default:
            self._swap(node, (f"relu_{node.name}",), nn.ReLU, "ReLU", (args[0],))

    def _transposed_weight(self, arg: Argument) -> torch.fx.Node | None:
        """The parameter behind `permute(w, [1, 0])` or `t(w)`, else None."""
        if not isinstance(arg, torch.fx.Node) or arg.target not in TRANSPOSES:
            return None
        weight = arg.args[0]
        if not _is_attr(weight):
            return None
        if arg.target == aten.permute.default and _list_arg(arg, 1) != [1, 0]:
            return None
        return weight

    def _rnn(self, node: torch.fx.Node, kind: str) -> None:
        # aten.lstm/gru.input(input, hx, params, has_biases, num_layers, dropout, train, bidirectional, batch_first)
        x = _arg(node, 0, torch.fx.Node)
        # nn.LSTM takes its state as a tuple (h, c), aten.lstm as a list; GRU has a single tensor
        hx: Argument = tuple(_list_arg(node, 1)) if kind == "LSTM" else _arg(node, 1, torch.fx.Node)
        flat_params = _list_arg(node, 2)
        has_biases, num_layers = _arg(node, 3, bool), _arg(node, 4, int)
        bidirectional, batch_first = _arg(node, 7, bool), _arg(node, 8, bool)
        params = [p for p in flat_params if _is_attr(p)]
        if len(params) != len(flat_params):
            return
        tensors = [_attr(self.gm, str(p.target)) for p in params]
        gates = 4 if kind == "LSTM" else 3
        per_direction = 4 if has_biases else 2
        directions = 2 if bidirectional else 1
        hidden = tensors[1].shape[1]
        # Projections (proj_size) add a fifth weight per direction: leave such layers as they are.
        if len(tensors) != num_layers * directions * per_direction or tensors[1].shape[0] != gates * hidden:
            return
        cls = nn.LSTM if kind == "LSTM" else nn.GRU

        def make() -> nn.Module:
            rnn = cls(
                tensors[0].shape[1], hidden, num_layers=num_layers, bias=has_biases,
                batch_first=batch_first, bidirectional=bidirectional,
            )  # fmt: skip
            for name, tensor in zip(rnn._flat_weights_names, tensors, strict=True):
                setattr(rnn, name, _param(tensor))
            rnn.flatten_parameters()
            return rnn.eval()

        indices: dict[torch.fx.Node, int] = {}  # LSTM user -> the output it reads
        if kind == "LSTM":
            # aten.lstm returns (output, h, c) and nn.LSTM (output, (h, c)): only plain indexing is rewired.
            for user in node.users:
                index = user.args[1] if user.target is operator.getitem else None
                if not isinstance(index, int) or index not in (0, 1, 2):
                    return
                indices[user] = index
        name = self._add(node, (kind.lower(), *(str(p.target) for p in params)), make, kind)
        with self.graph.inserting_before(node):
            call = self.graph.call_module(name, (x, hx))
        call.meta = dict(node.meta)
        if kind == "GRU":  # nn.GRU returns (output, h) like aten.gru
            node.replace_all_uses_with(call)
        else:
            for user, index in indices.items():
                with self.graph.inserting_before(user):
                    if index == 0:
                        new = self.graph.call_function(operator.getitem, (call, 0))
                    else:
                        state = self.graph.call_function(operator.getitem, (call, 1))
                        new = self.graph.call_function(operator.getitem, (state, index - 1))
                user.replace_all_uses_with(new)
                self.graph.erase_node(user)
        self.graph.erase_node(node)

    def _embedding(self, node: torch.fx.Node) -> None:
        # aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)
        w, indices, *rest = node.args
        padding_idx = rest[0] if rest else -1
        if not _is_attr(w) or any(rest[1:]) or node.kwargs:
            return  # scale_grad_by_freq / sparse only matter in training, but keep such calls untouched
        if not isinstance(padding_idx, int):
            return  # a symbolic padding_idx: nn.Embedding needs a number
        weight = _attr(self.gm, str(w.target))

        def make() -> nn.Module:
            emb = nn.Embedding(
                weight.shape[0], weight.shape[1], padding_idx=None if padding_idx < 0 else padding_idx
            )
            emb.weight = _param(weight)
            return emb

        self._swap(node, ("embedding", str(w.target)), make, "Embedding", (indices,))

    def run(self) -> None:
        for node in _nodes(self.graph):
            if node.op != "call_function":
                continue
            args = node.args
            if node.target == aten.linear.default and _is_attr(args[1]) and not node.kwargs:
                weight, bias = args[1], (args[2] if len(args) > 2 else None)
                if bias is None or _is_attr(bias):
                    self._linear(node, args[0], weight, bias)
            elif node.target == aten.addmm.default and not node.kwargs and _is_attr(args[0]):
                bias, transposed = args[0], self._transposed_weight(args[2])
                if transposed is not None:
                    self._linear(node, args[1], transposed, bias)
            elif node.target == aten.mm.default:
                transposed = self._transposed_weight(args[1])
                if transposed is not None:
                    self._linear(node, args[0], transposed, None)
            elif node.target in (aten.lstm.input, aten.gru.input):
                self._rnn(node, "LSTM" if node.target == aten.lstm.input else "GRU")
            elif node.target == aten.embedding.default and self.embeddings:
                self._embedding(node)
            elif self.static:
                self._static_ops(node)


def _strip_checks(graph: torch.fx.Graph) -> None:
    """Drop export's input guards and shape assertions: they are Python-only and block TorchScript."""
    for node in list(graph.nodes):
        name = getattr(node.target, "__name__", str(node.target))
        is_guard = node.op == "call_module" and str(node.target).startswith("_guards_fn")
        is_assert = node.op == "call_function" and name.split(".")[0] in (
            "_assert_scalar", "_assert_tensor_metadata", "_assert_async", "sym_constrain_range",
            "sym_constrain_range_for_size",
        )  # fmt: skip
        if (is_guard or is_assert) and not node.users:
            graph.erase_node(node)


def _final_name(path: str, taken: set[str]) -> str:
    base = path.replace(".", "_") or "layer"
    if not base.isidentifier() or keyword.iskeyword(base) or hasattr(nn.Module, base):
        base = f"layer_{base}"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name


def _plain_outputs(graph: torch.fx.Graph, out_spec: Any, warnings: list[str]) -> None:
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    if out_spec is None or not isinstance(flat, (tuple, list)):
        return
    if out_spec.is_leaf() and len(flat) == 1:
        output.args = (flat[0],)
    elif out_spec.type not in (tuple, list) or not all(c.is_leaf() for c in out_spec.children_specs):
        warnings.append(
            "the int8 model returns its outputs as a flat tuple: the original output nesting is lost"
        )


def rebuild_modules(program: Any, *, embeddings: bool = False, static: bool = False) -> RebuiltModel:
    """Rebuild nn.Linear / nn.LSTM / nn.GRU (and nn.Embedding) modules from an ExportedProgram's aten calls.

    Args:
        program: a torch.export.ExportedProgram.
        embeddings: also rebuild `aten.embedding` calls as nn.Embedding.
        static: also rebuild convolutions, eval-mode batch norms and ReLUs as modules, and call the torch
            functions FX quantization matches for pooling, flatten, add, cat… (see FUNCTIONS).

    Returns:
        A RebuiltModel whose module takes the program's user inputs positionally and computes the same
        function; op targets are overload packets (torch.ops.aten.add) so that torch.jit.script resolves them.

    Example:
        >>> rebuilt = rebuild_modules(torch.export.load("model.pt2"))
        >>> torch.ao.quantization.quantize_dynamic(rebuilt.module, {torch.nn.Linear})
    """
    gm = program.module()
    graph = gm.graph
    warnings: list[str] = []
    codegen = graph._codegen
    pytree_info = getattr(codegen, "pytree_info", None)
    _strip_checks(graph)
    builder = _Rebuilder(gm, embeddings, static)
    builder.run()
    graph.eliminate_dead_code()
    if pytree_info is not None:
        in_spec = pytree_info.in_spec
        if in_spec is not None and in_spec.num_leaves != len(
            [n for n in graph.nodes if n.op == "placeholder"]
        ):
            warnings.append("the int8 model takes the program's inputs as flat positional tensors")
        _plain_outputs(graph, pytree_info.out_spec, warnings)
    graph.set_codegen(CodeGen())
    for node in graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            function = FUNCTIONS.get(node.target) if static else None
            node.target = function or node.target.overloadpacket
    kept = {
        str(n.target)
        for n in graph.nodes
        if n.op in ("get_attr", "call_module") and n.target in builder.modules
    }
    root: dict[str, Any] = {}
    taken = {str(n.target).split(".")[0] for n in graph.nodes if n.op in ("get_attr", "call_module")}
    taken -= set(builder.modules)
    float_weights = set()
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in builder.modules:
            root[str(node.target)] = _attr(gm, str(node.target))
            if node.op == "get_attr" and isinstance(root[str(node.target)], nn.Parameter):
                float_weights.add(str(node.target).rsplit(".", 1)[0])
    layers: dict[str, tuple[str, str]] = {}
    ordered = sorted(kept, key=lambda temp: int(temp.rsplit("_", 1)[1]))  # graph order, for stable names
    renames = {temp: _final_name(builder.origin[temp][0], taken) for temp in ordered}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in renames:
            node.target = renames[str(node.target)]
            node._rename(f"{node.target}_out")  # readable artifact code: `stem_out = self.stem(x)`
    for temp, name in renames.items():
        root[name] = builder.modules[temp]
        layers[name] = builder.origin[temp]
    module = torch.fx.GraphModule(root, graph, class_name="QaasRebuilt")
    return RebuiltModel(module.eval(), layers, float_weights, warnings)
