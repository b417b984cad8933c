"""Zip archives from users: safety checks before anything reads them, and model format detection by content.

Only the stdlib is imported at module level; the pickle check of a `.pt2` imports torch when it runs.
"""

from __future__ import annotations

import io
import json
import os
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from workers.engine.errors import EngineError

__all__ = ["EXPORT_HINT", "check_pt2_payloads", "check_zip", "detect_model_format", "open_zip"]

MAX_ENTRIES = 10_000
MAX_TOTAL_UNCOMPRESSED = 16 * 1024**3
# A deflated entry this many times larger than its compressed size is a zip bomb, not model weights.
MAX_RATIO = 200
RATIO_CHECK_MIN_BYTES = 1024**2
NATIVE_SUFFIXES = (".so", ".dll", ".dylib", ".cpp", ".pyd")
LISTED_NAMES = 8

EXPORT_HINT = (
    "export it to .pt2 with torch.export, then upload model.pt2:\n"
    '    batch = torch.export.Dim("batch")\n'
    '    ep = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": {0: batch}})\n'
    '    torch.export.save(ep, "model.pt2")\n'
    "(example is an input batch of 2 or more, so that the batch size stays dynamic)"
)


def _unsafe_name(name: str) -> bool:
    if "\x00" in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return True
    return ".." in PurePosixPath(name.replace("\\", "/")).parts


def check_zip(zf: zipfile.ZipFile, *, code: str, what: str) -> list[str]:
    """Refuse archives that are too big, too many, compressed like a bomb or escaping with their paths.

    Args:
        zf: the open archive.
        code: the EngineError code to raise ("not_a_model", "invalid_dataset").
        what: the noun for messages ("model", "dataset").

    Returns:
        The entry names.

    Raises:
        EngineError: with `code` when a limit is broken.
    """
    infos = zf.infolist()
    if len(infos) > MAX_ENTRIES:
        raise EngineError(
            code, f"the {what} archive has {len(infos)} entries; at most {MAX_ENTRIES} are accepted"
        )
    total = 0
    for info in infos:
        if _unsafe_name(info.filename):
            raise EngineError(code, f"the {what} archive has an unsafe entry path {info.filename!r}")
        total += info.file_size
        ratio_suspect = info.compress_size > 0 and info.file_size / info.compress_size > MAX_RATIO
        if info.file_size > RATIO_CHECK_MIN_BYTES and ratio_suspect:
            raise EngineError(
                code, f"the {what} archive entry {info.filename!r} expands more than {MAX_RATIO}x"
            )
    if total > MAX_TOTAL_UNCOMPRESSED:
        raise EngineError(
            code,
            f"the {what} archive expands to {total} bytes; at most {MAX_TOTAL_UNCOMPRESSED} are accepted",
        )
    return [info.filename for info in infos]


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
    """Tell a torch.export program from a TorchScript archive by content, never by file name.

    Args:
        path: the uploaded file.

    Returns:
        "pt2" or "torchscript".

    Raises:
        EngineError: not_a_model, pickle_not_allowed (a `torch.save(model)` file, with the lines that export
            it instead), native_code_not_allowed (AOTInductor packages, shared libraries, C++ sources).

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
            f"not a torch.export program or TorchScript archive: found {size} bytes that are not a zip archive",
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
            if zf.read(f"{prefixes[0]}/archive_format").strip() != b"pt2":
                raise EngineError(
                    "not_a_model", "the archive_format entry does not say pt2; re-save the program"
                )
            return "pt2"
        tops = {n.split("/", 1)[0] for n in files if "/" in n}
        for top in tops:
            if any(n.startswith(f"{top}/code/") for n in files) and f"{top}/constants.pkl" in files:
                return "torchscript"
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in files):
            raise EngineError("pickle_not_allowed", "this is a pickled model (torch.save); " + EXPORT_HINT)
    raise EngineError(
        "not_a_model",
        f"not a torch.export program or TorchScript archive: found a plain zip with files {_listing(files)}",
    )


def _weights_only_ok(data: bytes) -> bool:
    import torch

    try:
        with warnings.catch_warnings():  # it warns about pickle protocols; a refusal is the answer here
            warnings.simplefilter("ignore")
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:
        return False
    return True


def _config_entries(zf: zipfile.ZipFile, name: str) -> dict[str, dict]:
    if name not in zf.namelist():
        return {}
    try:
        config = json.loads(zf.read(name)).get("config", {})
    except (ValueError, AttributeError) as exc:
        raise EngineError("model_load_failed", f"{name} in the archive is not valid JSON: {exc}") from exc
    return config if isinstance(config, dict) else {}


def check_pt2_payloads(path: str | Path) -> None:
    """Refuse a `.pt2` whose loading would unpickle arbitrary objects.

    torch.export.load unpickles some payloads with weights_only=False (pickled weights and constants, sample
    inputs after a failed safe load) and opaque constants with pickle.loads. Every such payload must load with
    weights_only=True first; opaque and TorchBind objects, and the pre-2.8 layout, are refused.

    Raises:
        EngineError: pickle_not_allowed or unsupported_format.
    """
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if "version" in names or any(n.startswith("serialized_") for n in names):
            raise EngineError(
                "unsupported_format",
                "this .pt2 uses the layout of torch 2.7 or older: re-save it with torch.export.save",
            )
        for prefix in _pt2_prefixes(sorted(names)):
            for model_json in sorted(
                n for n in names if n.startswith(f"{prefix}/models/") and n.endswith(".json")
            ):
                model = os.path.basename(model_json)[: -len(".json")]
                pickled = [f"{prefix}/data/sample_inputs/{model}.pt"]
                pickled += [f"{prefix}/data/weights/{model}.pt", f"{prefix}/data/constants/{model}.pt"]
                weights = _config_entries(zf, f"{prefix}/data/weights/{model}_weights_config.json")
                constants = _config_entries(zf, f"{prefix}/data/constants/{model}_constants_config.json")
                for fqn, meta in constants.items():
                    if str(meta.get("path_name", "")).startswith(("opaque_obj_", "custom_obj_")):
                        raise EngineError(
                            "pickle_not_allowed",
                            f"the program holds a Python or TorchBind object constant ({fqn}); only tensors are accepted",
                        )
                for folder, config in (("weights", weights), ("constants", constants)):
                    pickled += [
                        f"{prefix}/data/{folder}/{m.get('path_name')}"
                        for m in config.values()
                        if m.get("use_pickle")
                    ]
                for entry in pickled:
                    if entry in names and not _weights_only_ok(zf.read(entry)):
                        raise EngineError(
                            "pickle_not_allowed",
                            f"{entry} holds pickled objects other than tensors; re-save the program with "
                            "torch.export.save from plain tensors",
                        )
