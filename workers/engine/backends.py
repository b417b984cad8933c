"""Run a job on its backend, or on every candidate backend and keep the one `auto` chooses.

    return run(job, lambda backend: make_int8_model(job, backend))

With one backend the artifact goes straight into out_dir. With `auto` each candidate is quantized into its own
folder (out_dir/.candidates/<backend>), verified on the same data, and timed on the same inputs at the first
benchmark batch size; `cpu.choose_backend` keeps the fastest (within 10 %, the more faithful), the winner's
artifact moves into out_dir and the other candidates are deleted. A candidate that fails for a reason of its
own (its declaration's `recoverable` codes, qaas.contract.backends) is recorded in metrics["backends"] and
the others go on.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

from workers.engine import lowering
from workers.engine.checks.bench import LOCK_WAIT, compare, host_lock
from workers.engine.checks.verify import call_model
from workers.engine.cpu import choose_backend
from workers.engine.errors import EngineError
from workers.engine.job import Int8Model, Job
from workers.engine.measure import batch_sizes, prepare_verification
from workers.engine.outcome import Candidate, build, finish
from workers.engine.result import ProgressFn, QuantResult

__all__ = ["CANDIDATES_DIR", "run"]

CANDIDATES_DIR = ".candidates"
CANDIDATE_SPAN = (5.0, 70.0)  # the progress percent auto's candidates share

Convert = Callable[[str], Int8Model]
Measure = Callable[[Job, dict[str, Candidate]], dict[str, float]]


def _scaled(report: ProgressFn, backend: str, low: float, high: float) -> ProgressFn:
    """A candidate's progress (0-70 %) mapped into its share of auto's run, its messages tagged."""

    def scaled(stage: str, percent: float, message: str) -> None:
        share = min(max(percent, 0.0), CANDIDATE_SPAN[1]) / CANDIDATE_SPAN[1]
        report(stage, round(low + (high - low) * share, 1), f"[{backend}] {message}")

    return scaled


def _runner(model: Any, by_name: bool) -> Callable[[Any], Any]:
    return lambda batch: call_model(model, batch, by_name=by_name)


def time_candidates(job: Job, built: dict[str, Candidate]) -> dict[str, float]:
    """int8 p50 latency in ms of each candidate, interleaved on the same inputs at the first benchmark size."""
    size = batch_sizes(job)[0]
    inputs = job.random_batch(size, job.config.seed)
    runners = {name: _runner(cand.int8, job.by_name) for name, cand in built.items()}
    job.report("benchmarking", 71.0, f"timing {' and '.join(built)} at batch {size} to choose")

    def waiting() -> None:
        job.report("benchmarking", 71.0, "waiting for another benchmark on this host to finish")

    with host_lock(on_wait=waiting) as lock:
        timings = compare(runners, inputs, job.config.benchmark)
    job.cache[LOCK_WAIT] = job.cache.get(LOCK_WAIT, 0.0) + lock.waited_s  # finish reports it
    return {name: ms["p50"] for name, ms in timings.items()}


def _convert(job: Job, convert: Convert, backend: str) -> Int8Model:
    """convert(backend); an unexpected failure of the backend's own tools becomes the EngineError the backend
    says (`Lowering.failure`: x86's torchao and Inductor on a .pt2), which `auto` records before it goes on."""
    try:
        return convert(backend)
    except EngineError:
        raise
    except Exception as exc:
        error = lowering.get(backend).failure(job, exc)
        if error is None:
            raise
        raise error from exc


def _single(job: Job, convert: Convert) -> QuantResult:
    check = prepare_verification(job)
    with lowering.get(job.backend).context():
        made = _convert(job, convert, job.backend)
        return finish(job, build(job, made, job.out_dir, check))


def run(job: Job, convert: Convert, measure: Measure | None = None) -> QuantResult:
    """Build the job's backend (or auto's candidates), keep one, benchmark it: the QuantResult.

    Args:
        convert: makes the Int8Model for a backend; it runs with that backend's quantized engine set and
            job.backend naming it.
        measure: auto's timing of the verified candidates, {backend: int8 p50 ms}; time_candidates when None.

    Raises:
        EngineError: the candidate's error with one backend; with auto, the first candidate's error when
            every candidate failed, or any error that is not about a backend.
    """
    if job.requested != "auto":
        return _single(job, convert)
    report, folder = job.report, job.out_dir / CANDIDATES_DIR
    check = prepare_verification(job)  # shared: the same inputs, the float outputs computed once
    common = list(job.notes)
    built: dict[str, Candidate] = {}
    errors: dict[str, EngineError] = {}
    low, high = CANDIDATE_SPAN
    step = (high - low) / len(job.candidates)
    try:
        for i, backend in enumerate(job.candidates):
            job.backend, job.notes = backend, list(common)
            job.report = _scaled(report, backend, low + i * step, low + (i + 1) * step)
            try:
                with lowering.get(backend).context():
                    cand = build(job, _convert(job, convert, backend), folder / backend, check)
            except EngineError as exc:
                if not lowering.get(backend).recoverable(exc):
                    raise
                errors[backend] = exc
                continue
            cand.notes = job.notes[len(common) :]
            built[backend] = cand
        job.report = report
        if not built:
            raise next(iter(errors.values()))
        timings = (measure or time_candidates)(job, built) if len(built) > 1 else {}
        name, reason = _choose(job, built, timings, errors)
        winner = built[name]
        target = job.out_dir / winner.path.name
        os.replace(winner.path, target)
        winner.path = target
        job.backend, job.notes = name, common + winner.notes
        result = finish(job, winner)
    finally:
        job.report = report
        shutil.rmtree(folder, ignore_errors=True)
    if not timings:  # one candidate: its latency is the benchmark's at the first batch size
        timings = {name: result.metrics["latency"][0]["int8_ms"]["p50"]}
    result.metrics["backends"] = _table(job, built, timings, errors)
    result.metrics["backend_choice"] = reason
    return result


def _choose(
    job: Job, built: dict[str, Candidate], timings: dict[str, float], errors: dict[str, EngineError]
) -> tuple[str, str]:
    if len(built) > 1:
        numbers = {n: {"int8_ms_p50": timings[n], "cosine": c.fidelity["cosine"]} for n, c in built.items()}
        name, reason = choose_backend(numbers)
        return name, f"{reason}, at batch {batch_sizes(job)[0]} on this CPU"
    name = next(iter(built))
    others = {**job.dropped, **errors}
    if not others:
        return name, f"{name} is the only backend this worker serves for this model and mode"
    why = "; ".join(f"{n}: {e.message}" for n, e in others.items())
    return name, f"{name} is the only candidate left ({why})"


def _table(
    job: Job, built: dict[str, Candidate], timings: dict[str, float], errors: dict[str, EngineError]
) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in sorted({*built, *errors, *job.dropped}):
        if name in built:
            cand = built[name]
            table[name] = {
                "int8_ms_p50": timings[name],
                "cosine": cand.fidelity["cosine"],
                "artifact": cand.artifact,
            }
        else:
            error = errors.get(name) or job.dropped[name]
            table[name] = {"error": error.to_dict()}
    return table
