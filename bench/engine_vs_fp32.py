"""Table 1: the engine's int8 against fp32, as a user gets it: `workers.engine.api.quantize` on the uploaded
file (`.pt2` or a zipped Hugging Face model) with `.npz` calibration and evaluation data, one job per backend.

Latency, size and fidelity are the engine's own `result.metrics` (its benchmark interleaves fp32 and int8 run
by run on one thread). fp32 is the model as uploaded, run eagerly (a `.pt2`'s `ExportedProgram.module()`, a
Hugging Face model's transformers module); "same build" is fp32 compiled the way the int8 artifact is
(TorchScript or AOTInductor). When the engine fails while benchmarking a batch size, the job is run again at
the first batch size and the bench times the others itself (marked in the table).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.models import Case, Prepared, prepare
from bench.tables import FAILED, MISSING, Table, fmt, ratio, times
from bench.timing import interleaved, iterations_for, probe, torch_threads

__all__ = ["EngineRun", "Settings", "engine_tables", "load_int8", "run_case", "run_engine"]

MB = 1e6
BUSY = "the host was busy while benchmarking"
SAME_BUILD_COST = 2.4  # one timing round runs fp32, fp32 same-build and int8: about 2.4 fp32 runs


@dataclass(frozen=True)
class Settings:
    """How hard to time: `budget_s` of timing per job sizes the engine's iterations between the bounds."""

    quick: bool = False
    threads: int = 1
    batch_sizes: tuple[int, ...] = (1, 32)
    budget_s: float = 30.0
    min_iterations: int = 10
    max_iterations: int = 200
    backends: tuple[str, ...] | None = None  # None: each case's own

    @classmethod
    def for_run(cls, *, quick: bool, backends: tuple[str, ...] | None = None) -> Settings:
        if quick:
            return cls(quick=True, budget_s=3.0, min_iterations=3, max_iterations=20, backends=backends)
        return cls(backends=backends)


@dataclass
class EngineRun:
    """One engine job: its result or the error, the wall time, the latency rows (engine's or bench's)."""

    prepared: Prepared
    backend: str
    seconds: float = 0.0
    result: Any = None  # QuantResult
    error: str | None = None
    iterations: int = 0
    latency: list[dict[str, Any]] = field(default_factory=list)
    bench_timed: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)  # seconds per engine progress stage

    @property
    def case(self) -> Case:
        return self.prepared.case

    @property
    def chosen(self) -> str:
        return self.result.backend if self.result is not None else self.backend

    @property
    def artifact(self) -> Path | None:
        return Path(self.result.artifacts[0].path) if self.result is not None else None

    def row(self, batch: int) -> dict[str, Any] | None:
        return next((r for r in self.latency if r["batch_size"] == batch), None)


def _torch_inputs(case: Case, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in case.make_inputs(batch, 100 + seed).items()}


def _iterations(prepared: Prepared, settings: Settings) -> int:
    module, cost = prepared.module, 0.0
    with torch_threads(settings.threads):
        for size in settings.batch_sizes:
            inputs = _torch_inputs(prepared.case, size)
            cost += probe(lambda i=inputs: module(**i))
    budget = settings.budget_s / SAME_BUILD_COST
    return iterations_for(cost, budget, settings.min_iterations, settings.max_iterations)


def _config(
    case: Case, backend: str, settings: Settings, batch_sizes: tuple[int, ...], iterations: int
) -> Any:
    from qaas.contract.jobs import BenchmarkConfig, DynamicConfig, StaticConfig

    bench = BenchmarkConfig(batch_sizes=batch_sizes, threads=settings.threads, iterations=iterations)
    if case.mode == "static":
        batches = max(1, case.calibration_samples // case.calibration_batch)
        return StaticConfig(
            backend=backend, calibration_batches=batches, batch_size=case.calibration_batch, benchmark=bench
        )
    return DynamicConfig(backend=backend, benchmark=bench)


def load_int8(run: EngineRun) -> Any:
    """The run's int8 artifact loaded the way its load snippet says, as a callable on positional inputs."""
    from workers.engine.lowering.torchscript import load_torchscript
    from workers.engine.lowering.x86.aoti import load_aoti

    path = run.artifact
    assert path is not None, "the run has no artifact"
    return load_aoti(path) if path.name.endswith(".aoti.pt2") else load_torchscript(path, run.chosen)


def _fp32_as_uploaded(prepared: Prepared) -> Any:
    if prepared.case.fmt == "pt2":
        return torch.export.load(prepared.model_path).module()
    return prepared.module


def _bench_time(run: EngineRun, sizes: list[int], settings: Settings) -> None:
    """Time fp32 as uploaded against the int8 artifact at `sizes` (no same-build), interleaved."""
    fp32, int8 = _fp32_as_uploaded(run.prepared), load_int8(run)
    for size in sizes:
        args = tuple(_torch_inputs(run.case, size).values())
        with torch_threads(settings.threads):
            runners = {"fp32": lambda a=args: fp32(*a), "int8": lambda a=args: int8(*a)}
            ms = interleaved(runners, run.iterations)
        speedup = ratio(ms["fp32"]["p50"], ms["int8"]["p50"])
        run.latency.append(
            {"batch_size": size, "fp32_ms": ms["fp32"], "int8_ms": ms["int8"], "speedup": speedup}
        )
        run.bench_timed.append(size)


def run_engine(prepared: Prepared, backend: str, settings: Settings, out_dir: Path) -> EngineRun:
    """One engine job on a prepared case: quantize, verify and benchmark (see the module docstring)."""
    from workers.engine.api import quantize
    from workers.engine.errors import EngineError

    run = EngineRun(prepared, backend)
    run.iterations = _iterations(prepared, settings)
    stage = {"last": ""}
    mark = [time.perf_counter()]

    def progress(name: str, _percent: float, _message: str) -> None:
        # Seconds per progress stage (summed over attempts): where a slow job spends its time.
        now = time.perf_counter()
        if stage["last"]:
            run.stages[stage["last"]] = run.stages.get(stage["last"], 0.0) + now - mark[0]
        stage["last"], mark[0] = name, now

    def attempt(sizes: tuple[int, ...]) -> Any:
        config = _config(prepared.case, backend, settings, sizes, run.iterations)
        return quantize(
            prepared.model_path,
            config,
            out_dir=out_dir,
            calibration=prepared.calibration,
            eval_data=prepared.eval_data,
            progress=progress,
        )

    start = time.perf_counter()
    sizes = settings.batch_sizes
    try:
        run.result = attempt(sizes)
    except EngineError as exc:
        run.error = f"{exc.code}: {exc.message}"
    except Exception as exc:
        run.error = f"engine error ({type(exc).__name__}: {_short(exc)})"
        if stage["last"] == "benchmarking" and len(sizes) > 1:
            # Quantizing and verifying worked; the engine's benchmark failed at a batch size. Keep the
            # artifact of a job timed at the first size and time the others here, with the error noted.
            run.notes.append(f"the engine failed benchmarking batch sizes {sizes}: {run.error}")
            run.error = None
            try:
                run.result = attempt(sizes[:1])
            except Exception as again:
                run.error = f"engine error ({type(again).__name__}: {_short(again)})"
    run.seconds = time.perf_counter() - start
    if stage["last"]:
        run.stages[stage["last"]] = run.stages.get(stage["last"], 0.0) + time.perf_counter() - mark[0]
    if run.result is not None:
        run.latency = list(run.result.metrics["latency"])
        missing = [s for s in sizes if run.row(s) is None]
        if missing:
            _bench_time(run, missing, settings)
    return run


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_case(case: Case, settings: Settings, work: Path, *, log: Any = print) -> list[EngineRun]:
    """Prepare a case and run one engine job per backend."""
    started = time.perf_counter()
    prepared = prepare(case, work / case.key)
    log(f"[engine] {case.name}: prepared in {time.perf_counter() - started:.1f} s ({case.description})")
    runs = []
    for backend in settings.backends or case.backends:
        if backend not in case.backends and backend != "auto":
            continue
        run = run_engine(prepared, backend, settings, work / case.key / f"int8-{backend}")
        status = run.error or f"{run.chosen}, {len(run.latency)} latency rows"
        log(f"[engine] {case.name} {backend}: {run.seconds:.1f} s ({stage_summary(run)}), {status}")
        runs.append(run)
    return runs


def stage_summary(run: EngineRun) -> str:
    """'calibrating 80 s, converting 12 s, …': the stages that took a second or more, slowest first."""
    slow = sorted(((t, name) for name, t in run.stages.items() if t >= 1), reverse=True)
    return ", ".join(f"{name} {t:.0f} s" for t, name in slow) or "every stage under 1 s"


def weights_ratio(run: EngineRun) -> float | None:
    if run.result is None:
        return None
    return ratio(run.prepared.weight_bytes, run.result.metrics["size"].get("int8_weight_bytes"))


def engine_tables(runs: list[EngineRun], settings: Settings) -> list[Table]:
    latency = Table(
        f"Engine int8 vs fp32 ({settings.threads} thread{'s' if settings.threads > 1 else ''}, p50 ms)",
        [
            "model", "mode", "backend", "batch", "fp32 ms", "int8 ms", "speedup",
            "fp32 same-build ms", "speedup vs same build", "iters",
        ],
    )  # fmt: skip
    sizes = Table(
        "Engine size and fidelity",
        [
            "model", "mode", "backend", "params", "fp32 file MB", "int8 file MB", "file ratio",
            "weights ratio", "SQNR dB", "cosine", "layers int8/float", "job s",
        ],
    )  # fmt: skip
    notes: list[str] = []
    busy: list[EngineRun] = []
    for run in runs:
        case, name = run.case, run.case.name
        label = run.chosen if run.chosen == run.backend else f"{run.backend}->{run.chosen}"
        if run.result is None:
            latency.add(name, case.mode, label, MISSING, MISSING, MISSING, FAILED, MISSING, MISSING, MISSING)
            sizes.add(name, case.mode, label, run.prepared.parameters, *([MISSING] * 6), FAILED, run.seconds)
            notes.append(f"{name} / {run.backend}: {run.error}")
            continue
        for row in run.latency:
            same = row.get("fp32_same_build_ms", {}).get("p50")
            mark = " (bench)" if row["batch_size"] in run.bench_timed else ""
            latency.add(
                name,
                case.mode,
                label,
                f"{row['batch_size']}{mark}",
                row["fp32_ms"]["p50"],
                row["int8_ms"]["p50"],
                times(row["speedup"]),
                same,
                times(row.get("speedup_same_build")),
                run.iterations,
            )
        metrics = run.result.metrics
        size, fid, layers = metrics["size"], metrics["fidelity"], metrics.get("layers", {})
        sizes.add(
            name,
            case.mode,
            label,
            run.prepared.parameters,
            size["fp32_bytes"] / MB,
            size["int8_bytes"] / MB,
            times(size["ratio"], 3),
            times(weights_ratio(run), 3),
            fid.get("sqnr_db"),
            fmt(fid.get("cosine"), 5),
            f"{layers.get('quantized', '?')}/{layers.get('float', '?')}",
            run.seconds,
        )
        for note in run.notes + list(metrics.get("warnings", [])):
            if BUSY in note:
                busy.append(run)
            else:
                notes.append(f"{name} / {run.chosen}: {note}")
        notes.append(f"{name} / {run.chosen}: job time by stage: {stage_summary(run)}")
    latency.notes = [
        "fp32 = the model as uploaded, run eagerly (ExportedProgram.module() for a .pt2, the transformers "
        "module for a Hugging Face zip); same build = fp32 compiled like the int8 artifact (TorchScript or "
        "AOTInductor); speedup = fp32 p50 / int8 p50, interleaved in one run by the engine's benchmark",
    ]
    if any(run.bench_timed for run in runs):
        latency.notes.append(
            "(bench): timed by the bench (fp32 as uploaded vs the int8 artifact) because the engine's "
            "benchmark failed at that batch size"
        )
    sizes.notes = [
        "file ratio = uploaded file / int8 artifact (the engine's metric); weights ratio = fp32 parameter "
        "bytes / int8 weight bytes in the artifact; SQNR and cosine of the int8 outputs against fp32 on the "
        "evaluation set (32 samples not used for calibration); job s = the whole quantize() call",
        *_unique(notes),
    ]
    if busy:
        sizes.notes.append(
            f"the engine found the host busy (load average above the CPU count) while benchmarking "
            f"{len(busy)} of {len(runs)} jobs: {', '.join(f'{r.case.name}/{r.chosen}' for r in busy)}"
        )
    return [latency, sizes]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
