"""The x86 backend's pt2e quantizer: torchao's X86InductorQuantizer configured for a job, with the layers
torch 2.13's Inductor would compile wrongly kept in float."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from workers.engine.checks.layers import module_path
from workers.engine.exclude import Exclusions

__all__ = [
    "SINGLE_CHANNEL_NOTE",
    "split_shared_activations",
    "make_quantizer",
    "quantization_config",
    "single_channel_convs",
]

# With a dynamic dimension, Inductor (torch 2.13, mkldnn_ir._prepare_convolution_fusion_create) gives a
# convolution whose input is both NCHW- and channels-last-contiguous (one channel) an NCHW output, as the fp32
# kernel without prepacked weights does; oneDNN's int8 kernel always writes channels-last. The next kernel then
# read the output in the wrong order: 6% accuracy on the digits CNN, or a stride assert when the package checks.
SINGLE_CHANNEL_OPS = {"aten.conv2d.default", "aten.conv3d.default"}
ANNOTATION = "quantization_annotation"  # the node.meta key of pt2e quantizers
SINGLE_CHANNEL_NOTE = (
    "{path} (a convolution with 1 input channel) is kept in float: with a dynamic batch, Inductor lays out "
    "its int8 output wrongly; it is a small share of the work"
)


def single_channel_convs(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """The conv2d/conv3d calls whose input has one channel and a dynamic dimension (SINGLE_CHANNEL_OPS)."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or str(node.target) not in SINGLE_CHANNEL_OPS or not node.args:
            continue
        value = getattr(node.args[0], "meta", {}).get("val")
        shape = tuple(getattr(value, "shape", ()))
        channels = shape[1] if len(shape) > 1 else None
        if isinstance(channels, int) and channels == 1 and any(isinstance(s, torch.SymInt) for s in shape):
            found.append(node)
    return found


def quantization_config(mode: str, observer: str, reduce_range: bool) -> Any:
    from torchao.quantization.pt2e import observer as observers
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config(
        is_qat=mode == "qat", is_dynamic=mode == "dynamic", reduce_range=reduce_range
    )
    if mode != "static" or observer == "histogram":
        return config  # QAT uses fake-quantize modules and dynamic observes nothing: no choice to make
    ctor = {"minmax": observers.MinMaxObserver, "moving_average": observers.MovingAverageMinMaxObserver}
    act = config.input_activation
    act = replace(act, observer_or_fake_quant_ctr=ctor[observer].with_args(eps=2**-12))
    return replace(config, input_activation=act, output_activation=act)


def make_quantizer(
    graph: torch.fx.Graph, config: Any, exclude: Sequence[str], notes: list[str]
) -> tuple[Any, list[str]]:
    """The X86InductorQuantizer for a job, and the paths of the single-channel convolutions that it keeps in
    float and `exclude` does not name."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        _annotate_nodes_not_quantize,
    )

    class Quantizer(X86InductorQuantizer):
        """Keeps the single-channel convolutions in float (SINGLE_CHANNEL_OPS); float convolutions end up
        unannotated."""

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            # Nodes already annotated are skipped by every pattern, fused ones (conv-bn-relu) included.
            _annotate_nodes_not_quantize(single_channel_convs(model.graph))
            super().annotate(model)
            # prepare_qat_pt2e's conv-bn fusion reads the input and weight specs of every annotated
            # convolution: the empty annotation of a float one (exclude too) raised IndexError there.
            for node in model.graph.nodes:
                annotation = node.meta.get(ANNOTATION)
                if str(node.target).startswith("aten.conv") and annotation and not annotation.input_qspec_map:
                    del node.meta[ANNOTATION]
            return model

    quantizer = Quantizer().set_global(config)
    layers = {module_path(n) for n in graph.nodes if n.op == "call_function"}
    # An entry names a module path (and everything under it) or a layer type ("Linear").
    matcher = Exclusions(exclude)
    excluded = {path for path, type_name in layers if path and matcher(path, type_name=type_name)}
    notes.extend(matcher.unused_warnings())
    for path in sorted(excluded):
        quantizer.set_module_name_qconfig(path, None)
    single = [module_path(node)[0] or node.name for node in single_channel_convs(graph)]
    return quantizer, [path for path in single if path not in excluded]


# Activations a model may call through one module several times (torchvision's ResNet blocks call their one
# nn.ReLU twice). A non-strict export leaves no source_fn_stack, so torch's source partitioner groups nodes by
# their innermost module path: both calls become one partition with two outputs, and X86InductorQuantizer
# raises "Input partition has more than one output node".
SHARED_ACTIVATION_OPS = {
    "aten.relu.default",
    "aten.relu_.default",
    "aten.hardtanh.default",
    "aten.hardtanh_.default",
}


def split_shared_activations(graph: torch.fx.Graph) -> int:
    """Give each call of a shared activation module a path of its own ("relu", "relu#2", ...) in its
    nn_module_stack, so that each call is a partition; returns how many calls were renamed. An activation has
    no weights: nothing else reads these paths for it."""
    seen: dict[str, int] = {}
    renamed = 0
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or str(node.target) not in SHARED_ACTIVATION_OPS or not stack:
            continue
        key, (path, cls) = list(stack.items())[-1]
        seen[path] = seen.get(path, 0) + 1
        if seen[path] > 1:
            node.meta["nn_module_stack"] = {**stack, key: (f"{path}#{seen[path]}", cls)}
            renamed += 1
    return renamed
