"""Measuring an int8 model reloaded from disk: fidelity against the float model, accuracy, latency, size."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from qaas.contract.shapes import LABELS
from workers.engine.checks.bench import benchmark
from workers.engine.checks.verify import Batch, call_model, fidelity, fixed_batch, flat_outputs
from workers.engine.errors import EngineError
from workers.engine.inputs.data import inspect_dataset
from workers.engine.job import ROLES, Job
from workers.engine.lowering import ARTIFACTS

__all__ = ["Verification", "accuracy", "latency", "prepare_verification", "sizes", "verify"]

MIN_COSINE = 0.9
RANDOM_BATCH = 4
# A dynamic batch must stay dynamic: the artifact also runs at these sizes (16 and up: oneDNN's convolution
# heuristics change at 16, and an AOTInductor package once narrowed its batch to 2..15 there).
EXTRA_BATCHES = (1, 3, 17)
ACCURACY_BATCH = 64
MAX_ACCURACY_SAMPLES = 10_000
MAX_ACCURACY_DROP = 1.0  # points: more is worth a warning


@dataclasses.dataclass
class Verification:
    """The inputs every candidate is verified on and the float model's outputs on them, computed once.

    `extra` are batches of EXTRA_BATCHES (unless the batch is fixed): a dynamic batch must stay dynamic.
    """

    batches: list[Batch]
    extra: list[Batch]
    floats: list[Any]


def prepare_verification(job: Job) -> Verification:
    """Evaluation data, else calibration, else training data, else generated inputs; the float outputs.

    Raises:
        EngineError: verification_failed when the float model fails on these inputs.
    """
    batches: list[Batch] = []
    for role in ("eval", "calibration", "train"):
        if role in job.files:
            batches = job.batches(role)
            if batches:
                break
    specs, seed = job.loaded.info.inputs, job.config.seed
    if not batches:
        job.notes.append(
            "no evaluation data given: fidelity is measured on random inputs, which says little about accuracy"
        )
        batches = [job.random_batch(fixed_batch(specs) or RANDOM_BATCH, seed)]
    extra = [] if fixed_batch(specs) is not None else [job.random_batch(n, seed + n) for n in EXTRA_BATCHES]
    try:
        floats = [call_model(job.loaded.module, b, by_name=job.by_name) for b in batches + extra]
    except Exception as exc:
        raise EngineError(
            "verification_failed",
            f"the float model fails on the verification inputs ({type(exc).__name__}: {exc}); "
            "check input_shapes or the evaluation data",
        ) from exc
    return Verification(batches, extra, floats)


def verify(job: Job, check: Verification, int8: Any, reference: Any) -> dict[str, Any]:
    """Fidelity of the reloaded int8 model against the float model; the gate checks `reference` when given.

    Raises:
        EngineError: verification_failed when the int8 model fails, changes output shapes, or its cosine
            against the gate is below 0.9.
    """
    batches, by_name, n = check.batches, job.by_name, len(check.batches)
    try:
        gate = (
            check.floats
            if reference is None
            else [call_model(reference, b, by_name=by_name) for b in batches]
        )
    except Exception as exc:
        raise EngineError(
            "verification_failed",
            f"the trained fake-quantized model fails to run ({type(exc).__name__}: {exc})",
        ) from exc
    try:
        candidate = [call_model(int8, b, by_name=by_name) for b in batches + check.extra]
    except Exception as exc:
        raise EngineError(
            "verification_failed",
            f"the int8 model reloaded from disk failed to run ({type(exc).__name__}: {exc})",
        ) from exc
    if check.extra:
        fidelity(check.floats[n:], candidate[n:])  # raises when shapes differ
    result = fidelity(check.floats[:n], candidate[:n])
    checked = result if reference is None else fidelity(gate[:n], candidate[:n])
    if checked["cosine"] is None or checked["cosine"] < MIN_COSINE:
        raise EngineError(
            "verification_failed",
            f"the int8 model's outputs are too far from the float model's (cosine {checked['cosine']}, "
            f"SQNR {checked['sqnr_db']} dB); keep the most sensitive layers in float with options.exclude",
        )
    if reference is not None and (result["cosine"] or 0) < MIN_COSINE:
        job.notes.append(
            f"the trained int8 model's outputs moved away from the uploaded model's (cosine {result['cosine']}): "
            "training changes the model; judge it by accuracy"
        )
    return result


def accuracy(job: Job, int8: Any) -> dict[str, float] | None:
    """Top-1 accuracy of fp32 and int8 in percent on labelled evaluation (QAT: else training) data."""
    roles = ("eval", "train") if job.mode == "qat" else ("eval",)
    role = next((r for r in roles if job.has_labels(r)), None)
    if role is None:
        return None
    batches = job.batches(role, batch_size=ACCURACY_BATCH, limit=MAX_ACCURACY_SAMPLES, labels=True)
    hits, total = {"fp32": 0, "int8": 0}, 0
    for batch in batches:
        labels = batch.pop(LABELS)
        for key, module in (("fp32", job.loaded.module), ("int8", int8)):
            outputs = flat_outputs(call_model(module, batch, by_name=job.by_name))
            scores = outputs[0] if outputs else None
            if scores is None or scores.dim() != 2 or scores.shape[1] < 2 or labels.shape != scores.shape[:1]:
                job.notes.append(
                    f"the {ROLES[role]} data has labels but the model's first output is not class scores "
                    "[N, classes]: no accuracy reported"
                )
                return None
            hits[key] += int((scores.argmax(1) == labels.long()).sum())
        total += len(labels)
    if not total:
        return None
    if total < inspect_dataset(job.files[role]).num_samples:
        job.notes.append(f"accuracy is measured on the first {total} {ROLES[role]} samples")
    fp32, int8_acc = 100 * hits["fp32"] / total, 100 * hits["int8"] / total
    if fp32 - int8_acc > MAX_ACCURACY_DROP:
        job.notes.append(
            f"int8 accuracy is {fp32 - int8_acc:.2f} points below fp32 ({int8_acc:.2f} % against {fp32:.2f} %): "
            "keep the worst layers (per-layer SQNR) in float with options.exclude, or try static with more "
            "calibration data or QAT"
        )
    return {"fp32": round(fp32, 3), "int8": round(int8_acc, 3), "delta": round(int8_acc - fp32, 3)}


def batch_sizes(job: Job) -> list[int]:
    """The benchmark's batch sizes: the asked ones, or the model's fixed batch (with a note)."""
    sizes = list(job.config.benchmark.batch_sizes)
    fixed = fixed_batch(job.loaded.info.inputs)
    if fixed is not None and sizes != [fixed]:
        note = f"the model has a fixed batch size of {fixed}: benchmarked at {fixed} only"
        if note not in job.notes:
            job.notes.append(note)
        return [fixed]
    return sizes


def latency(job: Job, int8: Any, same_build: Any, kind: str) -> list[dict[str, Any]]:
    """fp32 (as uploaded) against int8, and against fp32 compiled the same way when given, at every size."""
    by_name, config = job.by_name, job.config
    rows = benchmark(
        lambda b: call_model(job.loaded.module, b, by_name=by_name),
        lambda b: call_model(int8, b, by_name=by_name),
        lambda size: job.random_batch(size, config.seed),
        config.benchmark,
        batch_sizes(job),
        (lambda b: call_model(same_build, b, by_name=by_name)) if same_build is not None else None,
    )
    for row in rows:
        if row["speedup"] < 1:
            job.notes.append(f"int8 is not faster than fp32 at batch {row['batch_size']} on this CPU")
        elif row.get("speedup_same_build", 1) < 1:
            job.notes.append(
                f"int8 is not faster than fp32 compiled the same way ({ARTIFACTS[kind].build}) at batch {row['batch_size']}"
            )
    return rows


def _float_bytes(job: Job) -> int:
    """The float model's size: the upload, or for a Hugging Face zip its safetensors weights."""
    directory = job.loaded.directory
    if job.format == "hf" and directory is not None:
        weights = sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))
        if weights:
            return weights
    return job.model_path.stat().st_size


def sizes(job: Job, artifact: Path, kind: str) -> dict[str, Any]:
    """{fp32_bytes, int8_bytes, ratio, int8_weight_bytes, int8_code_bytes}; an AOTInductor package's
    weights are the constants linked into its .so, its code the rest of the .so."""
    fp32_bytes, int8_bytes = _float_bytes(job), artifact.stat().st_size
    weights, code = ARTIFACTS[kind].parts(artifact)
    return {
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "ratio": round(fp32_bytes / int8_bytes, 3),
        "int8_weight_bytes": weights,
        "int8_code_bytes": code,
    }
