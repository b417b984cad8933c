"""Zip archives from users: safety checks before anything reads them, and model format detection by content.

Only the stdlib is imported at module level; the pickle check of a `.pt2` imports torch when it runs.
"""

from __future__ import annotations

import ast
import collections
import io
import json
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaas.archives import ArchiveLimits, ArchiveRefused, check_zip_file
from workers.engine.errors import EngineError

__all__ = [
    "EXPORT_HINT",
    "HF_MODEL_TYPES",
    "HFArchive",
    "check_pt2_payloads",
    "check_zip",
    "detect_model_format",
    "extract_hf_model",
    "inspect_hf_archive",
    "open_zip",
]

# The rules are qaas.archives' (the API checks every upload with them too); these name its limits here.
MAX_ENTRIES = ArchiveLimits.max_entries
MAX_TOTAL_UNCOMPRESSED = ArchiveLimits.max_total_uncompressed
# A deflated entry this many times larger than its compressed size is a zip bomb, not model weights.
MAX_RATIO = ArchiveLimits.max_ratio
RATIO_CHECK_MIN_BYTES = ArchiveLimits.ratio_min_bytes
NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".cpp", ".pyd")
LISTED_NAMES = 8

# Hugging Face model directories: the architectures transformers builds itself (no remote code), encoders only.
HF_MODEL_TYPES = ("bert", "distilbert", "roberta")
HF_CONFIG = "config.json"
HF_INDEX = "model.safetensors.index.json"
HF_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
)
# Files whose loading unpickles (torch.save, joblib, pickle); safetensors is the only weight format read.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
MAX_JSON_BYTES = 16 * 1024**2
SAVE_HINT = (
    "save it with model.save_pretrained(folder, safe_serialization=True) and zip the folder "
    "(config.json, model.safetensors and the tokenizer files)"
)

# torch.export's archive layout, as torch 2.13 reads it (torch/csrc/export/pt2_archive_constants.h).
PT2_MODELS_DIR = "models/"
PT2_WEIGHTS_DIR = "data/weights/"
PT2_CONSTANTS_DIR = "data/constants/"
PT2_SAMPLE_INPUTS = "data/sample_inputs/{}.pt"
PT2_AOTI_DIR = "data/aotinductor/"
PT2_TENSOR_CONSTANT_PREFIX = "tensor_"
PT2_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")
# PyTorchStreamReader::getAllRecords copies each name into a 512-byte buffer: longer names are listed cut.
PT2_MAX_NAME_BYTES = 511
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

EXPORT_HINT = (
    "export it to .pt2 with torch.export, then upload model.pt2:\n"
    '    batch = torch.export.Dim("batch")\n'
    '    ep = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})\n'
    '    torch.export.save(ep, "model.pt2")\n'
    "(example is an input batch of 2 or more, so that the batch size stays dynamic)"
)


def check_zip(zf: zipfile.ZipFile, *, code: str, what: str) -> list[str]:
    """Refuse archives that are too big, too many, compressed like a bomb or escaping with their paths.

    The rules are qaas.archives.check_zip_file's, applied to the archive's file (its structures, not zf's
    entry list): entry count, total and per-entry expansion, unsafe paths, symbolic links, encryption, a
    damaged directory and the headers of `.safetensors` entries.

    Args:
        zf: the open archive.
        code: the EngineError code to raise ("not_a_model", "invalid_dataset").
        what: the noun for messages ("model", "dataset").

    Returns:
        The entry names.

    Raises:
        EngineError: with `code` when a limit is broken.
    """
    limits = ArchiveLimits(
        max_entries=MAX_ENTRIES,
        max_total_uncompressed=MAX_TOTAL_UNCOMPRESSED,
        max_ratio=MAX_RATIO,
        ratio_min_bytes=RATIO_CHECK_MIN_BYTES,
    )
    source = zf.filename if zf.filename is not None else zf.fp
    if source is None:
        raise ValueError("check_zip needs an open archive")
    try:
        check_zip_file(source, limits)
    except ArchiveRefused as exc:
        # qaas.archives' zip messages begin with "the archive": name it ("the model archive").
        message = exc.message
        if message.startswith("the archive"):
            message = f"the {what} archive{message[len('the archive') :]}"
        raise EngineError(code, message) from exc
    return zf.namelist()


def open_zip(path: str | Path) -> zipfile.ZipFile | None:
    """The archive at `path`, or None when the file is not a readable zip."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError):
        return None


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED_NAMES]) or "no files"
    more = len(names) - LISTED_NAMES
    return shown + (f" and {more} more" if more > 0 else "")


def _looks_like_pickle(head: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) and the protocol number; torch.save's legacy format is one.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _pt2_prefixes(names: list[str]) -> list[str]:
    prefixes = []
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "archive_format":
            prefix = parts[0]
            if any(n.startswith(f"{prefix}/models/") and n.endswith(".json") for n in names):
                prefixes.append(prefix)
    return prefixes


def detect_model_format(path: str | Path) -> str:
    """Tell a torch.export program, a TorchScript archive and a zipped Hugging Face model apart by content.

    Args:
        path: the uploaded file.

    Returns:
        "pt2", "torchscript" or "hf".

    Raises:
        EngineError: not_a_model, pickle_not_allowed (a `torch.save(model)` file, with the lines that export
            it instead; pickled weights in a Hugging Face folder), native_code_not_allowed (AOTInductor
            packages, shared libraries, C++ sources), unsupported_format (a Hugging Face model that needs its
            own Python code, or a model_type qaas does not serve).

    Example:
        >>> detect_model_format("model.pt2")
        'pt2'
    """
    path = Path(path)
    zf = open_zip(path)
    if zf is None:
        with path.open("rb") as f:
            head = f.read(2)
        if _looks_like_pickle(head):
            raise EngineError("pickle_not_allowed", "this is a pickled model (torch.save); " + EXPORT_HINT)
        size = path.stat().st_size
        raise EngineError(
            "not_a_model",
            f"not a torch.export program, TorchScript archive or zipped Hugging Face model: found {size} bytes "
            "that are not a zip archive",
        )
    with zf:
        names = check_zip(zf, code="not_a_model", what="model")
        files = [n for n in names if not n.endswith("/")]
        native = [n for n in files if n.lower().endswith(NATIVE_SUFFIXES) or "/data/aotinductor/" in f"/{n}"]
        if native:
            raise EngineError(
                "native_code_not_allowed",
                f"the archive holds native code ({_listing(native)}); AOTInductor packages and compiled "
                "libraries would run on the worker. Upload the torch.export program (torch.export.save) instead",
            )
        prefixes = _pt2_prefixes(files)
        if prefixes:
            # torch's archive reader takes its root folder from the first entry: one root, or it reads another.
            if {n.split("/", 1)[0] for n in files} != {prefixes[0]} or any("/" not in n for n in files):
                raise EngineError(
                    "not_a_model", "a .pt2 archive keeps every file under one folder; re-save it"
                )
            _pt2_records(zf)  # names that torch's reader would resolve to another entry
            if zf.read(f"{prefixes[0]}/archive_format").strip() != b"pt2":
                raise EngineError(
                    "not_a_model", "the archive_format entry does not say pt2; re-save the program"
                )
            return "pt2"
        tops = {n.split("/", 1)[0] for n in files if "/" in n}
        for top in tops:
            if any(n.startswith(f"{top}/code/") for n in files) and f"{top}/constants.pkl" in files:
                return "torchscript"
        if _hf_root(files) is not None:
            inspect_hf_archive(zf, files)
            return "hf"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in files):
            raise EngineError("pickle_not_allowed", "this is a pickled model (torch.save); " + EXPORT_HINT)
    raise EngineError(
        "not_a_model",
        "not a torch.export program, TorchScript archive or zipped Hugging Face model (config.json and "
        f"*.safetensors): found a plain zip with files {_listing(files)}",
    )


def _raw_name(info: zipfile.ZipInfo) -> bytes:
    # zipfile decodes names as UTF-8 when flagged, cp437 otherwise (both reversible); miniz compares bytes.
    return info.filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")


def _plain_path(name: str) -> bool:
    return (
        bool(name)
        and not name.startswith("/")
        and "\\" not in name
        and "\x00" not in name
        and all(part not in ("", ".", "..") for part in name.split("/"))
    )


def _pt2_records(zf: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """The archive as torch's reader sees it: its root folder and its records (names below the root).

    torch.export.load reads through PyTorchStreamReader (caffe2/serialize/inline_container.cc): the root is
    the first entry's top folder, every lookup is `root + "/" + name` matched by miniz without regard to
    ASCII case, and the listing cuts names at 511 bytes. Names that miniz could match to another entry than
    zipfile (case twins, duplicates, cut names) or that only exist to be reached by joined paths (`//`,
    absolute, `..`, `\\`) are refused, so that every name below means one entry to both readers.

    Raises:
        EngineError: not_a_model.
    """
    infos = zf.infolist()
    if not infos or "/" not in infos[0].filename:
        raise EngineError("not_a_model", "a .pt2 archive keeps every file under one folder; re-save it")
    seen: dict[bytes, str] = {}
    for info in infos:
        raw, name = _raw_name(info), info.filename
        if len(raw) > PT2_MAX_NAME_BYTES:
            raise EngineError(
                "not_a_model",
                f"the archive entry {name[:64]!r}… is {len(raw)} bytes long; torch's reader cuts names at "
                f"{PT2_MAX_NAME_BYTES} bytes and would read another file: re-save the program",
            )
        if not _plain_path(name.removesuffix("/")):
            raise EngineError(
                "not_a_model",
                f"the archive entry {name!r} is not a plain relative path (it is absolute, or holds '//', "
                "'\\', '.' or '..'); torch.export.save never writes one: re-save the program",
            )
        folded = raw.lower()  # bytes.lower() folds ASCII only, as miniz does
        if folded in seen:
            raise EngineError(
                "not_a_model",
                f"the archive entries {seen[folded]!r} and {name!r} differ only in case (or are the same "
                "name twice); torch's reader ignores case and could read either: re-save the program",
            )
        seen[folded] = name
    root = infos[0].filename.split("/", 1)[0]
    records: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if not info.filename.startswith(f"{root}/"):
            raise EngineError(
                "not_a_model",
                f"the archive entry {info.filename!r} is outside the folder {root!r} that torch reads; "
                "a .pt2 archive keeps every file under one folder: re-save it",
            )
        records[info.filename[len(root) + 1 :]] = info
    return root, records


def _parse_json(data: bytes | str, where: str, fix: str) -> Any:
    """JSON as torch and transformers read it (UTF-8 text), with any failure a not_a_model refusal."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise EngineError(
            "not_a_model", f"{where} in the archive is not valid JSON ({problem}); {fix}"
        ) from exc


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
            # torch.export.save pickles only tensor subclasses and object constants, and loads them with
            # weights_only=False: any pickle is refused, not inspected.
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


def _check_program(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    """Refuse what the program JSON makes torch evaluate: symbolic shapes (sympify) and pytree imports."""
    program = _parse_json(zf.read(info), info.filename, RESAVE_HINT)
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
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
    are torch.load'ed with weights_only=False and whose `custom_obj_`/`opaque_obj_` constants are unpickled.
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
        root, records = _pt2_records(zf)
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


@dataclass
class HFArchive:
    """A checked Hugging Face model folder inside a zip.

    `root` is the folder's prefix in the archive ("" or "name/"); the file lists are relative to it.
    """

    root: str
    config: dict[str, Any]
    weights: list[str]
    tokenizer_files: list[str] = field(default_factory=list)
    index: str | None = None

    @property
    def has_tokenizer(self) -> bool:
        """Whether the folder holds a tokenizer transformers can build (fast tokenizer, WordPiece or BPE files)."""
        names = set(self.tokenizer_files)
        return "tokenizer.json" in names or "vocab.txt" in names or {"vocab.json", "merges.txt"} <= names

    @property
    def files(self) -> list[str]:
        """The files to extract: the only ones transformers may read."""
        return [HF_CONFIG, *([self.index] if self.index else []), *self.weights, *self.tokenizer_files]


def _hf_root(files: list[str]) -> str | None:
    """The folder holding config.json at the top of the archive or one folder down, or None."""
    configs = [n for n in files if n == HF_CONFIG or (n.count("/") == 1 and n.endswith("/" + HF_CONFIG))]
    if not configs:
        return None
    return min(configs, key=lambda n: n.count("/"))[: -len(HF_CONFIG)]


def _read_json(zf: zipfile.ZipFile, name: str) -> dict[str, Any]:
    """A JSON object from the archive; anything else (another JSON value, bad or too deep JSON) is refused."""
    if zf.getinfo(name).file_size > MAX_JSON_BYTES:
        raise EngineError("not_a_model", f"{name} is larger than {MAX_JSON_BYTES} bytes; it is not a config")
    content = _parse_json(zf.read(name), name, SAVE_HINT)
    if not isinstance(content, dict):
        raise EngineError(
            "not_a_model",
            f"{name} in the archive holds a JSON {type(content).__name__}, not an object; {SAVE_HINT}",
        )
    return content


def _head(zf: zipfile.ZipFile, name: str) -> bytes:
    with zf.open(name) as f:
        return f.read(2)


def _refuse_code_and_pickles(zf: zipfile.ZipFile, files: list[str], root: str) -> None:
    python = [n for n in files if n.lower().endswith(".py")]
    if python:
        raise EngineError(
            "unsupported_format",
            f"the archive holds Python code ({_listing(python)}); qaas never runs a model's own code "
            f"(trust_remote_code is off): remove it. Served architectures: {', '.join(HF_MODEL_TYPES)}",
        )
    # safetensors files start with a header length that may look like a pickle opcode: never sniff them.
    pickled = [
        n
        for n in files
        if n.lower().endswith(PICKLE_SUFFIXES)
        or (not n.endswith(".safetensors") and _looks_like_pickle(_head(zf, n)))
    ]
    if pickled:
        has_safetensors = any(n.startswith(root) and n.endswith(".safetensors") for n in files)
        fix = "remove them from the zip" if has_safetensors else SAVE_HINT
        raise EngineError(
            "pickle_not_allowed",
            f"the archive holds pickled files ({_listing(pickled)}): loading them would run arbitrary code, "
            f"and qaas reads *.safetensors weights only; {fix}",
        )


def _refuse_remote_code(zf: zipfile.ZipFile, root: str, config: dict[str, Any]) -> None:
    tokenizer_config = root + "tokenizer_config.json"
    sources = [(HF_CONFIG, config)]
    if tokenizer_config in zf.namelist():
        sources.append(("tokenizer_config.json", _read_json(zf, tokenizer_config)))
    for name, content in sources:
        if "auto_map" in content:
            raise EngineError(
                "unsupported_format",
                f"{name} names its own Python classes (auto_map): qaas never runs a model's own code "
                f"(trust_remote_code is off). Served architectures: {', '.join(HF_MODEL_TYPES)}; "
                "remove auto_map if the model is one of them",
            )


def inspect_hf_archive(zf: zipfile.ZipFile, files: list[str] | None = None) -> HFArchive:
    """Check a zipped Hugging Face model folder without extracting it.

    The folder is the one holding config.json, at the top of the archive or one folder down. It must hold
    config.json with an allowed model_type and *.safetensors weights; Python files, pickled files (*.bin,
    *.pt, …, or pickle content), `auto_map` (remote code) and quantized configs are refused.

    Args:
        zf: the open archive, already passed through check_zip.
        files: its file entries (directories left out); read from zf when None.

    Raises:
        EngineError: not_a_model, pickle_not_allowed, unsupported_format.
    """
    if files is None:
        files = [n for n in zf.namelist() if not n.endswith("/")]
    root = _hf_root(files)
    if root is None:
        raise EngineError("not_a_model", f"no config.json in the archive; {SAVE_HINT}")
    _refuse_code_and_pickles(zf, files, root)
    config = _read_json(zf, root + HF_CONFIG)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise EngineError("not_a_model", f"{root}{HF_CONFIG} has no model_type; {SAVE_HINT}")
    _refuse_remote_code(zf, root, config)
    if model_type not in HF_MODEL_TYPES:
        raise EngineError(
            "unsupported_format",
            f"model_type {model_type!r} is not served: qaas quantizes the encoders {', '.join(HF_MODEL_TYPES)}",
        )
    if config.get("quantization_config"):
        raise EngineError(
            "unsupported_format",
            "this model is already quantized (quantization_config in config.json): upload the float model",
        )
    local = sorted(n[len(root) :] for n in files if n.startswith(root) and "/" not in n[len(root) :])
    weights = [n for n in local if n.endswith(".safetensors")]
    if not weights:
        raise EngineError("not_a_model", f"config.json has no *.safetensors weights beside it; {SAVE_HINT}")
    index = HF_INDEX if HF_INDEX in local else None
    if index is not None:
        weight_map = _read_json(zf, root + index).get("weight_map", {})
        missing = sorted(set(weight_map.values()) - set(weights)) if isinstance(weight_map, dict) else []
        if missing:
            raise EngineError(
                "not_a_model", f"{index} names weight files missing from the zip: {_listing(missing)}"
            )
    tokenizer_files = [n for n in local if n in HF_TOKENIZER_FILES]
    return HFArchive(root, config, weights, tokenizer_files, index)


def extract_hf_model(path: str | Path, target: str | Path) -> HFArchive:
    """Check a zipped Hugging Face model and extract only the files transformers needs into `target`.

    config.json, the safetensors weights (and their index) and the tokenizer files are written flat into
    `target`; nothing else in the archive is extracted, so nothing else can be read by transformers.

    Raises:
        EngineError: as detect_model_format; not_a_model when the file is another kind of model.

    Example:
        >>> extract_hf_model("bert.zip", "/tmp/job/model").has_tokenizer
        True
    """
    if detect_model_format(path) != "hf":
        raise EngineError("not_a_model", f"not a zipped Hugging Face model; {SAVE_HINT}")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as zf:
        archive = inspect_hf_archive(zf)
        for name in archive.files:
            info = zf.getinfo(archive.root + name)
            with zf.open(info) as src, (target / name).open("xb") as dst:
                # zipfile stops at the declared size and checks the CRC: a lying header cannot write more.
                while chunk := src.read(1024 * 1024):
                    dst.write(chunk)
    return archive
