"""What every quantization mode does before a backend runs: check the request, resolve the backends, open the Job.

A handler checks its request against the support matrix (`check_request`), opens a `Job` (model loaded, data
files checked against its inputs, candidate backends resolved from the registry, workers.engine.lowering), and
hands `backends.run` a function that makes an `Int8Model` for a backend; `outcome` writes, reloads, verifies
and measures it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qaas.contract.support import SUPPORT, backends_for, option_refusal, refusal
from workers.engine import lowering
from workers.engine.errors import EngineError
from workers.engine.inputs.archive import detect_model_format
from workers.engine.inputs.data import check_dataset_matches, inspect_dataset
from workers.engine.inputs.io import load_model
from workers.engine.job import ROLES, Job
from workers.engine.result import ProgressFn

__all__ = ["check_request", "resolve_candidates", "start_job"]


def _options(config: Any) -> dict[str, Any]:
    return {
        "weight_granularity": getattr(config, "weight_granularity", None),
        "quantize_embeddings": getattr(config, "quantize_embeddings", None),
    }


def check_request(mode: str, model_path: str | Path, config: Any) -> str:
    """The model's format, once the support matrix serves (format, mode, backend) with the config's options.

    Raises:
        EngineError: unsupported_combination with a sentence naming what works; any detection code.
    """
    fmt = detect_model_format(model_path)
    problem = refusal(fmt, mode, config.backend, **_options(config))
    if problem is not None:
        raise EngineError("unsupported_combination", problem)
    return fmt


def resolve_candidates(fmt: str, mode: str, config: Any) -> tuple[list[str], dict[str, EngineError]]:
    """The backends to build on this worker, and (auto) the ones left out with the reason.

    Raises:
        EngineError: unsupported_combination when the asked backend (or, for auto, every backend) cannot run.
    """
    if config.backend != "auto":
        lowering.get(config.backend).require(fmt)
        return [config.backend], {}
    dropped: dict[str, EngineError] = {}
    for backend in lowering.REGISTRY.values():
        if backend.name not in SUPPORT[fmt][mode]:
            continue
        problem = option_refusal(fmt, mode, backend.name, **_options(config))
        if problem is not None:
            dropped[backend.name] = EngineError("unsupported_combination", problem)
        elif (missing := backend.unavailable(fmt)) is not None:
            dropped[backend.name] = missing
    candidates = [b for b in backends_for(fmt, mode, **_options(config)) if b not in dropped]
    if not candidates:
        raise next(iter(dropped.values()))
    return candidates, dropped


def start_job(
    mode: str,
    model_path: str | Path,
    config: Any,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    data: dict[str, Any],
    progress: ProgressFn | None = None,
    fmt: str | None = None,
) -> Job:
    """Check the request, resolve the candidate backends, load the model, check every dataset against it.

    Args:
        data: dataset paths by role ("eval", "calibration", "train"); None values are ignored.
        fmt: the format check_request returned (checked again when None).

    Raises:
        EngineError: unsupported_combination, any load_model code, dataset_mismatch.
    """
    report = progress or (lambda stage, percent, message: None)
    fmt = fmt or check_request(mode, model_path, config)
    candidates, dropped = resolve_candidates(fmt, mode, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report("loading", 0.0, "loading the model")
    loaded = load_model(Path(model_path), input_shapes)
    files = {role: Path(path) for role, path in data.items() if path is not None}
    for role, path in files.items():
        check_dataset_matches(loaded.info, inspect_dataset(path), role=ROLES[role])
    job = Job(mode, config, Path(model_path), out, loaded, candidates[0], report, files, [])
    job.candidates, job.dropped = candidates, dropped
    return job
