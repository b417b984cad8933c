"""The second look: the artifact as downloaded, loaded in a fresh process, must behave as it did when verified.

The process that quantized a model has state a user's process lacks (the float modules, observers, Inductor's
in-memory caches, the quantized engine it set). `workers.runner quantize` therefore starts a second runner
(`workers.runner recheck`) that loads only the uploaded float model, the data and the artifact file, runs the
same verification inputs through both, and measures fidelity and accuracy again. The numbers it finds must
match the first process's within tolerance; they are the ones the report publishes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from workers.engine import lowering
from workers.engine.checks.verify import call_model, fidelity
from workers.engine.errors import EngineError
from workers.engine.measure import accuracy, prepare_verification
from workers.engine.pipeline import start_job
from workers.engine.quiet import quiet

__all__ = ["COSINE_TOLERANCE", "SQNR_TOLERANCE_DB", "recheck"]

COSINE_TOLERANCE = 1e-3
SQNR_TOLERANCE_DB = 1.0
SQNR_SATURATED_DB = 60.0  # above this both numbers mean "the same outputs"; float noise moves them freely
ACCURACY_TOLERANCE = 0.5  # points


def _differences(first: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    found = []
    cos_a, cos_b = first.get("cosine"), fresh.get("cosine")
    if cos_a is not None and cos_b is not None and abs(cos_a - cos_b) > COSINE_TOLERANCE:
        found.append(f"cosine {cos_b} against {cos_a}")
    sq_a, sq_b = first.get("sqnr_db"), fresh.get("sqnr_db")
    if (
        sq_a is not None
        and sq_b is not None
        and min(sq_a, sq_b) < SQNR_SATURATED_DB
        and abs(sq_a - sq_b) > SQNR_TOLERANCE_DB
    ):
        found.append(f"SQNR {sq_b} dB against {sq_a} dB")
    return found


def recheck(
    mode: str,
    model_path: str | Path,
    config: Any,
    *,
    artifact: str | Path,
    engine: str,
    first: dict[str, Any],
    input_shapes: Any = None,
    data: dict[str, Any],
) -> dict[str, Any]:
    """Load `artifact` afresh, run it and the float model on the verification inputs, compare with `first`.

    Args:
        engine: what runs the artifact: a quantized engine ("fbgemm", "x86") for a TorchScript file; ignored
            for an AOTInductor package (model.int8.aoti.pt2).
        first: the metrics the quantizing process reported ("fidelity", optionally "accuracy").
        data: dataset paths by role, as for start_job.

    Returns:
        {"fidelity": …, "accuracy": … or None, "samples": N, "batches": B}: the fresh process's numbers.

    Raises:
        EngineError: verification_failed when the artifact does not load or run here, changes output shapes,
            or gives numbers that differ from the first process's beyond tolerance.
    """
    artifact = Path(artifact)
    with quiet():
        job = start_job(
            mode, model_path, config, out_dir=artifact.parent, input_shapes=input_shapes, data=data
        )
        job.backend = engine if engine in lowering.REGISTRY else job.backend
        check = prepare_verification(job)
        try:
            int8 = lowering.artifact_for_file(artifact.name).load(artifact, engine)
            outputs = [call_model(int8, b, by_name=job.by_name) for b in check.batches + check.extra]
        except Exception as exc:
            raise EngineError(
                "verification_failed",
                f"{artifact.name} does not run when loaded in a fresh process ({type(exc).__name__}: {exc})",
            ) from exc
        n = len(check.batches)
        if check.extra:
            fidelity(check.floats[n:], outputs[n:])  # raises when the shapes differ
        fresh = fidelity(check.floats[:n], outputs[:n])
        scores = accuracy(job, int8)
    problems = _differences(first.get("fidelity") or {}, fresh)
    reported = first.get("accuracy")
    if reported and scores and not math.isclose(reported["int8"], scores["int8"], abs_tol=ACCURACY_TOLERANCE):
        problems.append(f"int8 accuracy {scores['int8']} % against {reported['int8']} %")
    if problems:
        raise EngineError(
            "verification_failed",
            f"{artifact.name} loaded in a fresh process does not behave as it did when it was made: "
            + "; ".join(problems),
        )
    samples = sum(len(next(iter(b.values()))) for b in check.batches if b)
    return {"fidelity": fresh, "accuracy": scores, "samples": samples, "batches": n}
