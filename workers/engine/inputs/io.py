"""Load and inspect user models: torch.export programs (`.pt2`), TorchScript archives, zipped Hugging Face models."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from workers.engine.errors import EngineError
from workers.engine.inputs.archive import detect_model_format
from workers.engine.inputs.models import InputSpec, LoadedModel, ModelInfo
from workers.engine.inputs.pt2_checks import check_pt2_payloads

__all__ = ["InputSpec", "LoadedModel", "ModelInfo", "detect_model_format", "inspect_model", "load_model"]

InputShapes = Mapping[str, Any]
MAX_RANK = 8
# Dtypes a user may name for a TorchScript input (the default is float32).
INPUT_DTYPES = (
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _leaf_layers(stacks: list[list[tuple[str, str]]]) -> dict[str, int]:
    """Count distinct innermost module paths that contain no other module, by class name."""
    innermost: dict[str, str] = {}
    containers: set[str] = set()
    for stack in stacks:
        real = [(p, t) for p, t in stack if p and not p.startswith("_empty")]
        if not real:
            continue  # an op of the root module's own forward: not inside a layer
        containers.update(p for p, _ in real[:-1])
        path, type_name = real[-1]
        innermost[path] = type_name
    counts: dict[str, int] = {}
    for path, type_name in innermost.items():
        if path not in containers:
            counts[type_name] = counts.get(type_name, 0) + 1
    return dict(sorted(counts.items()))


def _stack_of(node: torch.fx.Node) -> list[tuple[str, str]]:
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        out.append((str(path), name.rsplit(".", 1)[-1]))
    return out


def _pt2_info(ep: Any) -> ModelInfo:
    from torch.export.graph_signature import InputKind, TensorArgument

    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            raise EngineError(
                "unsupported_format",
                f"model input {spec.arg.name!r} is not a tensor; qaas feeds tensor inputs only",
            )
        val = nodes[spec.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise EngineError(
                "unsupported_format",
                f"model input {spec.arg.name!r} has no recorded tensor shape; re-export it",
            )
        shape: list[int | None] = [d if isinstance(d, int) else None for d in val.shape]
        inputs.append(InputSpec(spec.arg.name, shape, _dtype_name(val.dtype)))
    state = ep.state_dict
    parameters = sum(int(state[name].numel()) for name in ep.graph_signature.parameters if name in state)
    stacks = [_stack_of(n) for n in ep.graph.nodes if n.op == "call_function"]
    return ModelInfo("pt2", inputs, parameters, _leaf_layers(stacks))


def _parse_dim(name: str, dim: Any) -> int | None:
    if dim is None:
        return None
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise EngineError(
            "invalid_input_shapes",
            f"input_shapes[{name!r}] has dimension {dim!r}: use positive integers, or null for a dynamic one",
        )
    return dim


def _script_inputs(module: Any, input_shapes: InputShapes | None) -> list[InputSpec]:
    args = list(module.forward.schema.arguments)[1:]  # the first argument is self
    names = [a.name for a in args]
    if not input_shapes:
        example = ", ".join(f'"{n}": [null, ...]' for n in names) or '"x": [null, 16]'
        raise EngineError(
            "input_shapes_required",
            "TorchScript carries no input shapes: give input_shapes as JSON, one list per forward argument with "
            f"null for dynamic dimensions, e.g. {{{example}}}",
        )
    if not isinstance(input_shapes, Mapping):
        raise EngineError(
            "invalid_input_shapes", 'input_shapes must be a JSON object, e.g. {"x": [null, 16]}'
        )
    unknown = sorted(set(input_shapes) - set(names))
    if unknown:
        raise EngineError(
            "invalid_input_shapes",
            f"input_shapes names {', '.join(unknown)}, but forward takes {', '.join(names) or 'no arguments'}",
        )
    specs = []
    for arg in args:
        if arg.name not in input_shapes:
            if arg.default_value is not None or arg.has_default_value():
                continue
            raise EngineError(
                "invalid_input_shapes", f"input_shapes has no shape for forward argument {arg.name!r}"
            )
        if not arg.type.isSubtypeOf(torch._C.OptionalType.ofTensor()):
            raise EngineError(
                "invalid_input_shapes",
                f"forward argument {arg.name!r} is {arg.type}; qaas feeds tensor inputs only",
            )
        value = input_shapes[arg.name]
        dtype = "float32"
        if isinstance(value, Mapping):  # {"shape": [...], "dtype": "int64"} for non-float inputs
            dtype = str(value.get("dtype", "float32"))
            value = value.get("shape")
        if dtype not in INPUT_DTYPES:
            raise EngineError(
                "invalid_input_shapes", f"dtype {dtype!r} is unknown: use one of {', '.join(INPUT_DTYPES)}"
            )
        if not isinstance(value, list) or not 1 <= len(value) <= MAX_RANK:
            raise EngineError(
                "invalid_input_shapes",
                f"input_shapes[{arg.name!r}] must be a list of 1 to {MAX_RANK} dimensions, e.g. [null, 16]",
            )
        specs.append(InputSpec(arg.name, [_parse_dim(arg.name, d) for d in value], dtype))
    return specs


def _script_info(module: Any, input_shapes: InputShapes | None) -> ModelInfo:
    inputs = _script_inputs(module, input_shapes)
    parameters = sum(int(p.numel()) for p in module.parameters())
    counts: dict[str, int] = {}
    for name, sub in module.named_modules():
        if name and not any(True for _ in sub.children()):
            kind = sub.original_name
            counts[kind] = counts.get(kind, 0) + 1
    return ModelInfo("torchscript", inputs, parameters, dict(sorted(counts.items())))


def _load_program(path: Path) -> tuple[Any, Any]:
    check_pt2_payloads(path)
    try:
        # Deserializing warns about torch internals (pytree spec classes) that the user cannot act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(path))
            return ep, ep.module()
    except Exception as exc:
        raise EngineError(
            "model_load_failed",
            f"torch.export.load failed ({type(exc).__name__}: {exc}); this worker runs torch {torch.__version__}: "
            "export and save the program with the same version",
        ) from exc


def _load_script(path: Path) -> Any:
    try:
        return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:
        raise EngineError(
            "model_load_failed",
            f"torch.jit.load failed ({type(exc).__name__}: {exc}); re-save it with torch.jit.save",
        ) from exc


def load_model(
    path: str | Path, input_shapes: InputShapes | None = None, *, workdir: str | Path | None = None
) -> LoadedModel:
    """Load an uploaded model (format detected from content) with its inspection.

    Args:
        path: the `.pt2`, TorchScript or zipped Hugging Face model file.
        input_shapes: for TorchScript (which has no shapes), {name: [dims]} with None for dynamic dims,
            e.g. {"x": [None, 16]}; a value may also be {"shape": [...], "dtype": "int64"}. Ignored otherwise.
        workdir: where a Hugging Face model is extracted (a new folder inside it); a temporary directory
            that lives as long as the LoadedModel when None.

    Raises:
        EngineError: any detection code, input_shapes_required, invalid_input_shapes, model_load_failed.

    Example:
        >>> loaded = load_model("model.pt2"); loaded.module(torch.randn(4, 16))
    """
    path = Path(path)
    fmt = detect_model_format(path)
    if fmt == "hf":
        from workers.engine.inputs.hf import load_hf  # transformers is imported only for Hugging Face models

        return load_hf(path, workdir=workdir)
    if fmt == "pt2":
        ep, module = _load_program(path)
        return LoadedModel(fmt, module, _pt2_info(ep), program=ep)
    module = _load_script(path)
    return LoadedModel(fmt, module, _script_info(module, input_shapes))


def inspect_model(path: str | Path, input_shapes: InputShapes | None = None) -> ModelInfo:
    """Inspect an uploaded model: inputs (None marks dynamic dimensions), parameter count, layers by type.

    A Hugging Face model takes `input_ids` and `attention_mask`, both [None, None] int64 (any batch and
    sequence length), and its info has an "hf" section (model_type, whether a tokenizer came with it, …).

    Raises:
        EngineError: as load_model.

    Example:
        >>> inspect_model("model.pt2").to_dict()["inputs"]
        [{'name': 'x', 'shape': [None, 16], 'dtype': 'float32'}]
    """
    return load_model(path, input_shapes).info
