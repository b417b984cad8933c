"""What a `.pt2` could make torch.export.load run, refused before torch reads it (docs/security.md).

torch 2.13 reads a `.pt2` by its own rules (names matched without regard to case, payload paths joined with
os.path.join, every record under `models/` a program) and runs code from the file in several ways: pickled
payloads and sample inputs, sympified symbolic shapes, pytree specs that import modules, guard code that it
compiles and runs, and graph node targets it looks up by attribute path. check_pt2_payloads walks the archive
the way torch does and fails closed on each.
"""

from __future__ import annotations

import ast
import collections
import io
import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

from workers.engine.errors import EngineError
from workers.engine.inputs.archive import MAX_JSON_BYTES, _listing, _parse_json, check_zip, pt2_records

__all__ = ["check_pt2_payloads"]

# torch.export's archive layout, as torch 2.13 reads it (torch/csrc/export/pt2_archive_constants.h).
PT2_MODELS_DIR = "models/"
PT2_WEIGHTS_DIR = "data/weights/"
PT2_CONSTANTS_DIR = "data/constants/"
PT2_SAMPLE_INPUTS = "data/sample_inputs/{}.pt"
PT2_AOTI_DIR = "data/aotinductor/"
PT2_TENSOR_CONSTANT_PREFIX = "tensor_"
PT2_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")
_PT2_MODEL_RECORD = re.compile(r"models/([A-Za-z0-9_.-]+)\.json")
_PT2_PATH_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
RESAVE_HINT = "re-save the program with torch.export.save from plain tensors"
# What a symbolic shape (SymExpr.expr_str, a sympy srepr) may call: sympy's shape arithmetic and the
# functions torch's deserializer adds (ExportedProgramDeserializer.sympy_functions). torch passes the text to
# sympy.sympify, which evaluates it as Python.
SYM_EXPR_FUNCTIONS = frozenset(
    {
        "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "Abs", "Mod",
        "floor", "ceiling", "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan",
        "GreaterThan", "And", "Or", "Not", "Piecewise", "ExprCondPair",
        "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
        "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
        "ToFloat", "Identity",
    }
)  # fmt: skip
SYM_EXPR_CONSTANTS = frozenset({"oo", "zoo", "nan", "true", "false"})
_SYM_EXPR_STRINGS = {
    "Symbol": re.compile(r"[A-Za-z_][A-Za-z0-9_]*"),
    "Float": re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"),
}


def _payload_config(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, Any]:
    """The `config` mapping of a weights or constants config, as torch's _load_payload_config reads it."""
    if info.file_size > MAX_JSON_BYTES:
        raise EngineError(
            "not_a_model",
            f"{info.filename} is larger than {MAX_JSON_BYTES} bytes; it is not a payload config",
        )
    content = _parse_json(zf.read(info), info.filename, RESAVE_HINT)
    config = content.get("config") if isinstance(content, dict) else None
    if not isinstance(config, dict) or not all(isinstance(meta, dict) for meta in config.values()):
        raise EngineError(
            "not_a_model",
            f'{info.filename} is not a payload config ({{"config": {{name: {{"path_name": …}}}}}}); '
            "re-save the program with torch.export.save",
        )
    return config


def _check_payloads(
    zf: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo], config_name: str, folder: str
) -> None:
    """Refuse pickled payloads, object constants and payload names that torch would resolve elsewhere."""
    info = records.get(config_name)
    if info is None:
        raise EngineError(
            "not_a_model", f"the program has no {config_name}; re-save it with torch.export.save"
        )
    where = info.filename
    for fqn, meta in _payload_config(zf, info).items():
        path_name, use_pickle = meta.get("path_name"), meta.get("use_pickle")
        if folder == PT2_CONSTANTS_DIR and str(path_name).startswith(PT2_OBJECT_PREFIXES):
            raise EngineError(
                "pickle_not_allowed",
                f"the program holds a Python or TorchBind object constant ({fqn}), which torch.export.load "
                "unpickles; only tensors are accepted: " + RESAVE_HINT,
            )
        if use_pickle is not False:
            # torch.export.save pickles only tensor subclasses and object constants, and torch loads them
            # without the weights-only restriction: any pickle is refused, not inspected.
            code = "pickle_not_allowed" if use_pickle else "not_a_model"
            raise EngineError(
                code,
                f"{where} marks {fqn} as use_pickle={use_pickle!r}: torch.export.load would unpickle "
                f"it without restriction (tensor subclasses and custom objects are saved that way); {RESAVE_HINT}",
            )
        if not isinstance(path_name, str) or not _PT2_PATH_NAME.fullmatch(path_name):
            raise EngineError(
                "not_a_model",
                f"{where} gives {fqn} the file name {path_name!r}; torch.export.save writes plain "
                f"names such as weight_0: re-save the program",
            )
        if folder == PT2_CONSTANTS_DIR and not path_name.startswith(PT2_TENSOR_CONSTANT_PREFIX):
            raise EngineError(
                "not_a_model",
                f"{where} gives the constant {fqn} the file name {path_name!r}, which is not a tensor "
                f"({PT2_TENSOR_CONSTANT_PREFIX}N): re-save the program",
            )
        if folder + path_name not in records:
            raise EngineError(
                "not_a_model",
                f"{where} names {folder}{path_name} for {fqn}, which is not in the archive: re-save it",
            )


def _check_sample_inputs(zf: zipfile.ZipFile, records: dict[str, zipfile.ZipInfo], model: str) -> None:
    """torch loads sample inputs with weights_only=True and, when that fails, again without the restriction."""
    name = PT2_SAMPLE_INPUTS.format(model)
    info = records.get(name)
    if info is None:
        raise EngineError(
            "not_a_model", f"the program {model!r} has no {name} (its sample inputs); re-save it"
        )
    data = zf.read(info)
    if not data:
        return  # no sample inputs: torch does not load anything
    import torch

    try:
        with warnings.catch_warnings():  # it warns about pickle protocols; a refusal is the answer here
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True)  # torch's own first call, byte for byte
    except Exception as exc:
        raise EngineError(
            "pickle_not_allowed",
            f"{info.filename} holds objects other than plain CPU tensors ({type(exc).__name__}); "
            f"torch.export.load would unpickle it without restriction: {RESAVE_HINT} on the CPU",
        ) from exc


def _int_or_bool(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, bool)


def _safe_sym_expr(text: str) -> bool:
    """Whether a symbolic shape is a sympy repr built only of shape arithmetic (torch sympifies it: eval)."""
    if not (text.isascii() and text.isprintable()):  # sympify drops newlines before it parses
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    stack: list[ast.AST] = [tree.body]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in SYM_EXPR_FUNCTIONS:
                return False
            # Keywords are assumptions and precision: Symbol('s0', integer=True), Float('1.5', precision=53).
            if not all(kw.arg and _int_or_bool(kw.value) for kw in node.keywords):
                return False
            for index, arg in enumerate(node.args):
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    # Strings only name a symbol or spell a float, as their first argument.
                    pattern = _SYM_EXPR_STRINGS.get(node.func.id)
                    if index or pattern is None or not pattern.fullmatch(arg.value):
                        return False
                else:
                    stack.append(arg)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            stack.append(node.operand)
        elif isinstance(node, ast.Name):
            if node.id not in SYM_EXPR_CONSTANTS:
                return False
        elif not _int_or_bool(node):
            return False
    return True


def _check_treespec(text: Any, where: str) -> None:
    """Refuse pytree specs whose loading imports modules the file names (torch.utils._pytree.treespec_loads).

    A node's context is JSON read with enum_object_hook (an "__enum__" object imports its module) unless its
    type has its own reader: namedtuple's looks the name up, defaultdict's imports the factory's module.
    """
    from torch.utils import _pytree as pytree

    def no_enum(obj: dict[str, Any]) -> dict[str, Any]:
        if "__enum__" in obj:
            raise EngineError(
                "unsupported_format",
                f"{where} has a pytree spec keyed by an Enum ({str(obj.get('fqn'))[:80]!r}); torch.export.load "
                "would import the module it names: use str keys in the model's inputs and outputs",
            )
        return obj

    malformed = EngineError("not_a_model", f"{where} has a malformed pytree spec; {RESAVE_HINT}")
    spec = _parse_json(text, where, RESAVE_HINT) if isinstance(text, str) else None
    if not (isinstance(spec, list) and len(spec) == 2):
        raise malformed
    nodes = [spec[1]]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict) or not isinstance(node.get("children_spec", []), list):
            raise malformed
        name = node.get("type")
        typ = pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE.get(name) if isinstance(name, str) else None
        if typ is collections.defaultdict:
            raise EngineError(
                "unsupported_format",
                f"{where} has a defaultdict input or output; torch.export.load would import its factory "
                "from the module the file names: pass a plain dict",
            )
        context = node.get("context")
        if typ is not None and pytree.SUPPORTED_SERIALIZED_TYPES[typ].from_dumpable_context is None:
            if not isinstance(context, str):
                raise malformed
            try:
                json.loads(context, object_hook=no_enum)
            except (ValueError, RecursionError):
                raise malformed from None
        nodes.extend(node.get("children_spec", []))


# Graph node targets torch's deserializer resolves by attribute path (deserialize_operator) and calls: the
# PyTorch operators under torch.ops, and the few Python functions export writes into graphs.
_OP_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*|_[A-Za-z0-9][A-Za-z0-9_]*")
OPERATOR_TARGETS = frozenset(
    {
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs",
        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift",
    }
)  # fmt: skip
MATH_TARGETS = frozenset({"ceil", "floor", "trunc", "sqrt"})
TORCH_TARGETS = frozenset(
    {
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum",
        "_sym_sqrt", "_assert", "_assert_async", "_check", "_check_is_size", "_C._set_grad_enabled",
    }
)  # fmt: skip
# Guards (ExportedProgram.guards_code) are pasted into a function that torch compiles and runs on every call
# of the loaded module (torch/export/_unlift.py, _convert_guards_code_to_fn): shape comparisons only.
GUARD_NAMES = frozenset({"L", "math", "inf"})
GUARD_ATTRIBUTES = frozenset(
    {
        "size",
        "stride",
        "storage_offset",
        "dim",
        "shape",
        "isnan",
        "isinf",
        "inf",
        "nan",
        "ceil",
        "floor",
        "trunc",
    }
)
MAX_GUARD_CHARS = 4096
MAX_GUARDS = 10_000


def _safe_target(target: str) -> bool:
    """Whether a node target names a PyTorch operator (torch.ops.<namespace>.<op>[.<overload>]) or one of the
    Python functions export writes into graphs, and nothing else torch would look up and call."""
    import torch

    module, _, rest = target.partition(".")
    if module == "_operator":
        return rest in OPERATOR_TARGETS
    if module == "math":
        return rest in MATH_TARGETS
    if module != "torch":
        return False
    if rest in TORCH_TARGETS:
        return True
    parts = rest.split(".")
    if not (parts[0] == "ops" and len(parts) in (3, 4) and all(_OP_NAME.fullmatch(p) for p in parts[1:])):
        return False
    namespace, op = parts[1], parts[2]
    # Names the torch.ops objects answer themselves (load_library, import_module, …) are not operators.
    packet = torch._ops.OpOverloadPacket
    return not (
        hasattr(type(torch.ops), namespace)
        or hasattr(torch._ops._OpNamespace, op)
        or (len(parts) == 4 and hasattr(packet, parts[3]))
    )


def _safe_guard(text: str, names: frozenset[str]) -> bool:
    """Whether a guard is shape arithmetic on the inputs: `L['x'].size()[0] <= 64` and the like."""
    if len(text) > MAX_GUARD_CHARS or not (text.isascii() and text.isprintable()):
        return False
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    allowed = (
        ast.Expression, ast.Compare, ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Constant, ast.Name, ast.Subscript,
        ast.Attribute, ast.Call, ast.Load, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd, ast.Add, ast.Sub,
        ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE,
    )  # fmt: skip
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            return False
        if isinstance(node, ast.Name) and node.id not in names:
            return False
        if isinstance(node, ast.Attribute) and node.attr not in GUARD_ATTRIBUTES:
            return False
        if isinstance(node, ast.Call) and node.keywords:
            return False
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, str, type(None))):
            return False
    return True


def _check_guards(guards: Any, where: str) -> None:
    from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

    names = GUARD_NAMES | frozenset(SYMPY_INTERP)
    if not isinstance(guards, list) or len(guards) > MAX_GUARDS:
        raise EngineError("not_a_model", f"{where} has malformed guards_code; re-export the model")
    for guard in guards:
        if not (isinstance(guard, str) and _safe_guard(guard, names)):
            raise EngineError(
                "not_a_model",
                f"{where} has a guard that is not a comparison of input shapes ({str(guard)[:80]!r}); "
                "torch would compile and run it as Python on every call: re-export the model",
            )


def _check_program(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse what the program JSON makes torch evaluate: symbolic shapes (sympify), pytree imports, guard
    code (compiled and run on every call) and graph node targets (looked up by attribute path and called)."""
    program = _parse_json(zf.read(info), info.filename, RESAVE_HINT)
    if isinstance(program, dict) and "guards_code" in program:
        _check_guards(program["guards_code"], info.filename)
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if {"target", "inputs", "outputs"} <= item.keys():  # a graph node, in any (sub)graph
                target = item["target"]
                if not (isinstance(target, str) and _safe_target(target)):
                    raise EngineError(
                        "unsupported_format",
                        f"{info.filename} has a graph node calling {str(target)[:80]!r}, which is not a "
                        "PyTorch operator; torch.export.load would look it up and call it: re-export the model "
                        "with torch.export (its graphs call torch.ops operators)",
                    )
            for key, value in item.items():
                if key == "expr_str" and not (isinstance(value, str) and _safe_sym_expr(value)):
                    raise EngineError(
                        "not_a_model",
                        f"{info.filename} has a symbolic shape that is not sympy shape arithmetic "
                        f"({str(value)[:80]!r}); torch.export.load evaluates it as Python: re-export the model",
                    )
                if key in ("in_spec", "out_spec") and value is not None:
                    _check_treespec(value, info.filename)
                stack.append(value)


def check_pt2_payloads(path: str | Path) -> None:
    """Refuse a `.pt2` whose loading would run code from the file: fail closed, by torch's own reading rules.

    Mirrors torch 2.13's load_pt2 (torch/export/pt2_archive/_package.py): every record under `models/` is a
    program; for each, torch reads `data/sample_inputs/<m>.pt` (torch.load, weights_only=True, then without
    the restriction when that fails), the legacy `data/weights/<m>.pt` and `data/constants/<m>.pt` (the
    same), and the payload configs `data/{weights,constants}/<m>_*_config.json`, whose `use_pickle` entries
    are torch.load'ed without the weights-only restriction and whose `custom_obj_`/`opaque_obj_` constants are unpickled.
    The program JSON's symbolic shapes go through sympy.sympify (eval) and its pytree specs may import
    modules. So: the names must mean one entry each (_pt2_records); sample inputs must load with
    weights_only=True exactly as torch first loads them; pickled payloads, object constants, legacy files,
    AOTInductor files, odd payload names, and symbolic shapes other than sympy shape arithmetic are refused;
    a config that is missing, malformed or not a mapping is refused too.

    Raises:
        EngineError: pickle_not_allowed, native_code_not_allowed, not_a_model or unsupported_format.
    """
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if "version" in names or any(n.startswith("serialized_") for n in names):
            raise EngineError(
                "unsupported_format",
                "this .pt2 uses the layout of torch 2.7 or older: re-save it with torch.export.save",
            )
        check_zip(zf, code="not_a_model", what="model")
        root, records = pt2_records(zf)
        aoti = [f"{root}/{r}" for r in records if r.startswith(PT2_AOTI_DIR)]
        if aoti:
            raise EngineError(
                "native_code_not_allowed",
                f"the archive holds AOTInductor files ({_listing(aoti)}), which torch.export.load runs as "
                "native code; upload the torch.export program (torch.export.save) instead",
            )
        models = []
        for record in records:
            if record.startswith(PT2_MODELS_DIR):
                match = _PT2_MODEL_RECORD.fullmatch(record)
                if match is None:
                    raise EngineError(
                        "not_a_model",
                        f"the archive holds {root}/{record}, which torch.export.load would read as a program; "
                        "programs are models/<name>.json with a plain name: re-save the program",
                    )
                models.append(match.group(1))
        if not models:
            raise EngineError(
                "not_a_model", f"the archive has no program under {root}/{PT2_MODELS_DIR}; re-save it"
            )
        for model in models:
            for legacy in (f"{PT2_WEIGHTS_DIR}{model}.pt", f"{PT2_CONSTANTS_DIR}{model}.pt"):
                if legacy in records:
                    raise EngineError(
                        "pickle_not_allowed",
                        f"the archive holds {root}/{legacy}, pickled weights of an old layout that "
                        f"torch.export.load unpickles without restriction: {RESAVE_HINT}",
                    )
            _check_payloads(zf, records, f"{PT2_WEIGHTS_DIR}{model}_weights_config.json", PT2_WEIGHTS_DIR)
            _check_payloads(
                zf, records, f"{PT2_CONSTANTS_DIR}{model}_constants_config.json", PT2_CONSTANTS_DIR
            )
            _check_program(zf, records[f"{PT2_MODELS_DIR}{model}.json"])
        for model in models:  # last: the only check that imports torch and reads tensors
            _check_sample_inputs(zf, records, model)
