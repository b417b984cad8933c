"""Table 2: ONNX Runtime's own int8 on the same models, the peer a user would otherwise pick.

Each model is exported with torch.onnx.export (the TorchScript-based exporter, `dynamo=False`: the dynamo
exporter needs onnxscript), quantized by onnxruntime.quantization (`quantize_static`, QDQ format, per-channel
int8 weights, MinMax calibration on the same calibration samples, after `quant_pre_process`; or
`quantize_dynamic` for the sequence models) and run with one intra-op and one inter-op thread. In one
interleaved run per batch size the bench times torch fp32 eager (the nn.Module itself), our int8 artifact
(the engine's fastest backend for the model at batch 1, loaded as its load snippet says), ORT fp32 and ORT
int8. A model that cannot be exported or quantized gets a row with the reason.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.engine_vs_fp32 import EngineRun, Settings, load_int8
from bench.models import Prepared
from bench.tables import FAILED, MISSING, Table, fmt, ratio, times
from bench.timing import interleaved, iterations_for, probe, torch_threads

__all__ = ["PeerResult", "best_run", "peer_table", "run_peer"]

OPSET = 17
CALIBRATION_BATCH = 8
RUNNERS = 4  # torch fp32, our int8, ORT fp32, ORT int8


@dataclass
class PeerResult:
    """The peer comparison of one model: timings per batch size, sizes and fidelity, or the reason it failed."""

    prepared: Prepared
    ours: EngineRun | None
    ort_mode: str
    error: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    onnx_bytes: int = 0
    onnx_int8_bytes: int = 0
    ort_sqnr_db: float | None = None
    seconds: float = 0.0
    iterations: int = 0


def best_run(runs: list[EngineRun]) -> EngineRun | None:
    """The engine run with the lowest int8 p50 at the first batch size (what `auto` would tend to keep)."""
    timed = [r for r in runs if r.result is not None and r.latency]
    return min(timed, key=lambda r: r.latency[0]["int8_ms"]["p50"], default=None)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and the quantizer are loud (deprecations, tracer warnings, logging): keep the table clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def export_onnx(prepared: Prepared, path: Path) -> None:
    """The float nn.Module to ONNX with a dynamic batch (and sequence) dimension on every input."""
    names = list(prepared.eval_inputs)
    example = tuple(torch.from_numpy(v[:2]) for v in prepared.eval_inputs.values())
    axes = {n: {0: "batch"} for n in names} | {"output": {0: "batch"}}
    # Not under no_grad: there nn.TransformerEncoder takes its fused fast path, an op ONNX has no export for.
    with _quiet():
        torch.onnx.export(
            prepared.module,
            example,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
        )


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def quantize_onnx(prepared: Prepared, fp32: Path, out: Path) -> str:
    """ORT's int8 of the exported model: static QDQ for the CNNs, dynamic for the rest; returns the mode."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if prepared.case.mode == "dynamic":
        with _quiet():
            quantize_dynamic(str(fp32), str(out), weight_type=QuantType.QInt8)
        return "dynamic"

    class Reader(CalibrationDataReader):
        def __init__(self, inputs: dict[str, np.ndarray]) -> None:
            count = len(next(iter(inputs.values())))
            self.batches = iter(
                [
                    {k: v[s : s + CALIBRATION_BATCH] for k, v in inputs.items()}
                    for s in range(0, count, CALIBRATION_BATCH)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    source = fp32
    with _quiet():
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            source = fp32.with_suffix(".pre.onnx")
            quant_pre_process(str(fp32), str(source))
        except Exception:
            source = fp32  # pre-processing only helps; quantize the export as it is
        quantize_static(
            str(source),
            str(out),
            Reader(prepared.calibration_inputs),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return "static QDQ"


def _sqnr(reference: np.ndarray, candidate: np.ndarray) -> float | None:
    ref, cand = reference.astype(np.float64).ravel(), candidate.astype(np.float64).ravel()
    noise = float(((ref - cand) ** 2).sum())
    if noise == 0:
        return None
    return 10 * math.log10(max(float((ref**2).sum()), 1e-30) / noise)


def run_peer(prepared: Prepared, ours: EngineRun | None, settings: Settings, work: Path) -> PeerResult:
    """Export, quantize with ORT, and time torch fp32, our int8, ORT fp32 and ORT int8 interleaved."""
    mode = "static QDQ" if prepared.case.mode == "static" else "dynamic"
    result = PeerResult(prepared, ours, mode)
    started = time.perf_counter()
    folder = work / prepared.case.key / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    fp32_path, int8_path = folder / "model.onnx", folder / "model.int8.onnx"
    try:
        export_onnx(prepared, fp32_path)
    except Exception as exc:
        result.error = f"torch.onnx.export failed ({type(exc).__name__}: {_short(exc)})"
        return result
    try:
        result.ort_mode = quantize_onnx(prepared, fp32_path, int8_path)
        ort_fp32, ort_int8 = _session(fp32_path, settings.threads), _session(int8_path, settings.threads)
    except Exception as exc:
        result.error = f"ONNX Runtime quantization failed ({type(exc).__name__}: {_short(exc)})"
        return result
    result.onnx_bytes, result.onnx_int8_bytes = fp32_path.stat().st_size, int8_path.stat().st_size
    eval_feed = prepared.eval_inputs
    with torch_threads(settings.threads):
        reference = prepared.module(**{k: torch.from_numpy(v) for k, v in eval_feed.items()}).numpy()
    result.ort_sqnr_db = _sqnr(reference, ort_int8.run(None, eval_feed)[0])
    int8 = load_int8(ours) if ours is not None else None
    for size in settings.batch_sizes:
        feed = prepared.case.make_inputs(size, 100)
        tensors = {k: torch.from_numpy(v) for k, v in feed.items()}
        args = tuple(tensors.values())
        runners = {
            "torch_fp32": lambda t=tensors: prepared.module(**t),
            "ort_fp32": lambda f=feed: ort_fp32.run(None, f),
            "ort_int8": lambda f=feed: ort_int8.run(None, f),
        }
        if int8 is not None:
            runners["ours"] = lambda a=args: int8(*a)
        with torch_threads(settings.threads):
            cost = sum(probe(run) for run in runners.values())
            iterations = iterations_for(
                cost, settings.budget_s / 2, settings.min_iterations, settings.max_iterations
            )
            ms = interleaved(runners, iterations)
        result.iterations = max(result.iterations, iterations)
        result.rows.append({"batch_size": size} | {k: v["p50"] for k, v in ms.items()})
    result.seconds = time.perf_counter() - started
    return result


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def peer_table(results: list[PeerResult], settings: Settings) -> Table:
    table = Table(
        f"Our int8 vs ONNX Runtime int8 ({settings.threads} thread{'s' if settings.threads > 1 else ''}, p50 ms)",
        [
            "model", "ORT mode", "batch", "torch fp32 eager", "our int8", "ours vs eager", "ORT fp32",
            "ORT int8", "ORT speedup", "our int8 / ORT int8", "ours faster by", "ORT size ratio",
            "ORT int8 SQNR dB",
        ],
    )  # fmt: skip
    notes = []
    for res in results:
        name = res.prepared.case.name
        if res.error is not None:
            table.add(name, res.ort_mode, MISSING, *([MISSING] * 9), FAILED)
            notes.append(f"{name}: {res.error}")
            continue
        ours = res.ours.chosen if res.ours is not None else None
        for row in res.rows:
            mine = row.get("ours")
            table.add(
                name,
                res.ort_mode,
                row["batch_size"],
                row["torch_fp32"],
                f"{fmt(mine)} ({ours})" if mine is not None else "-",
                times(ratio(row["torch_fp32"], mine)),
                row["ort_fp32"],
                row["ort_int8"],
                times(ratio(row["ort_fp32"], row["ort_int8"])),
                fmt(ratio(mine, row["ort_int8"])),
                times(ratio(row["ort_int8"], mine)),
                times(ratio(res.onnx_bytes, res.onnx_int8_bytes)),
                res.ort_sqnr_db,
            )
        if res.ours is None:
            notes.append(f"{name}: no int8 artifact of ours to compare (every engine job failed)")
    table.notes = [
        "one interleaved run per batch size: torch fp32 eager (the nn.Module), our int8 artifact (backend in "
        "brackets), ORT fp32 and ORT int8 (CPU provider, intra_op_num_threads = threads, all graph "
        "optimizations); our int8 / ORT int8 < 1 means ours is faster; ORT int8 SQNR against torch fp32 on the "
        "evaluation set",
        *notes,
    ]
    return table
