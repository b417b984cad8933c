"""Zip archives from users: safety checks before anything reads them, and model format detection by content.

Only the stdlib is imported at module level. What a `.pt2` could make torch run is checked in
workers.engine.inputs.pt2_checks.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qaas.contract.archives import ArchiveLimits, ArchiveRefused, check_zip_file
from qaas.contract.support import listing
from workers.engine.errors import EngineError

__all__ = [
    "EXPORT_HINT",
    "HF_MODEL_TYPES",
    "HFArchive",
    "check_zip",
    "detect_model_format",
    "extract_hf_model",
    "inspect_hf_archive",
    "open_zip",
    "pt2_records",
]

# The rules are qaas.contract.archives' (the API checks every upload with them too); these name its limits here.
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

EXPORT_HINT = (
    "export it to .pt2 with torch.export, then upload model.pt2:\n"
    '    batch = torch.export.Dim("batch")\n'
    '    ep = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})\n'
    '    torch.export.save(ep, "model.pt2")\n'
    "(example is an input batch of 2 or more, so that the batch size stays dynamic)"
)


def check_zip(zf: zipfile.ZipFile, *, code: str, what: str) -> list[str]:
    """Refuse archives that are too big, too many, compressed like a bomb or escaping with their paths.

    The rules are qaas.contract.archives.check_zip_file's, applied to the archive's file (its structures, not zf's
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
        # qaas.contract.archives' zip messages begin with "the archive": name it ("the model archive").
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
    return listing(names, most=LISTED_NAMES, none="no files")


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
            pt2_records(zf)  # names that torch's reader would resolve to another entry
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


def _parse_json(data: bytes | str, where: str, fix: str) -> Any:
    """JSON as torch and transformers read it (UTF-8 text), with any failure a not_a_model refusal."""
    try:
        return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise EngineError(
            "not_a_model", f"{where} in the archive is not valid JSON ({problem}); {fix}"
        ) from exc


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


# PyTorchStreamReader::getAllRecords copies each name into a 512-byte buffer: longer names are listed cut.
PT2_MAX_NAME_BYTES = 511


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


def pt2_records(zf: zipfile.ZipFile) -> tuple[str, dict[str, zipfile.ZipInfo]]:
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
