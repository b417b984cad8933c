"""From an Int8Model to a result: write the artifact, reload it from disk, verify it; measure the one kept.

`build` turns what a backend made into a `Candidate` (the artifact written atomically, or compiled, then
reloaded and verified); `finish` benchmarks the kept candidate against fp32 as uploaded and fp32 compiled the
same way, and returns the QuantResult with its metrics, load snippet and manifest.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from workers.engine.checks.bench import LOCK_WAIT, environment, host_lock
from workers.engine.checks.layers import measure_layers
from workers.engine.cpu import cpu_info
from workers.engine.job import Int8Model, Job
from workers.engine.lowering import ARTIFACTS, Artifact
from workers.engine.measure import Verification, accuracy, latency, sizes, verify
from workers.engine.quiet import quiet
from workers.engine.result import ArtifactFile, QuantResult, sha256_file

__all__ = ["ENGINE_VERSION", "Candidate", "build", "finish"]

ENGINE_VERSION = "0.1"


@dataclasses.dataclass
class Candidate:
    """A backend's verified artifact: the file, the model reloaded from it, its fidelity and accuracy, and the
    inputs and float outputs it was verified on."""

    backend: str
    made: Int8Model
    path: Path
    int8: Any
    fidelity: dict[str, Any]
    accuracy: dict[str, float] | None
    check: Verification
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.made.kind

    @property
    def kept_as(self) -> Artifact:
        return ARTIFACTS[self.made.kind]

    @property
    def artifact(self) -> str:
        return self.kept_as.file

    @property
    def engine(self) -> str:
        """What runs the artifact: the torch.ao quantized engine of a TorchScript file, or x86_inductor."""
        return self.kept_as.runner(self.backend)


def build(job: Job, made: Int8Model, folder: Path, check: Verification) -> Candidate:
    """Write (or compile) the artifact into `folder`, reload it from disk, verify it, score its accuracy.

    Raises:
        EngineError: verification_failed (the artifact is removed), nothing_quantized (a package that runs no
            int8 kernel), model_load_failed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    kind = ARTIFACTS[made.kind]
    target = folder / kind.file
    with quiet():
        stage, percent, message = kind.saving
        job.report(stage, percent, message.format(file=target.name))
        path = kind.save(made.module, target)
        job.report(
            "verifying", 55.0, "reloading the artifact from disk and comparing it with the float model"
        )
        try:
            int8 = kind.load(path, job.backend)
            fid = verify(job, check, int8, made.reference)
            scores = accuracy(job, int8)
        except BaseException:
            path.unlink(missing_ok=True)  # an unverified model must not look like a result
            raise
    return Candidate(job.backend, made, path, int8, fid, scores, check)


def _same_build(job: Job, made: Int8Model) -> Any:
    if made.float_same_build is not None or made.make_same_build is None:
        return made.float_same_build
    job.report("benchmarking", 72.0, "compiling the fp32 program the same way, for the same-build speedup")
    try:
        return made.make_same_build()
    except Exception as exc:  # only a comparison is lost
        job.notes.append(
            f"the fp32 model could not be compiled the same way ({type(exc).__name__}): no same-build speedup"
        )
        return None


def _torchao_version() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return None
    try:
        return importlib.metadata.version("torchao")  # the version, without importing torchao's kernels
    except importlib.metadata.PackageNotFoundError:
        return None


def _manifest(job: Job, cand: Candidate) -> dict[str, Any]:
    config = job.config
    manifest = {
        "qaas_engine": ENGINE_VERSION,
        "mode": job.mode,
        "backend": cand.backend,
        "backend_requested": job.requested,
        "engine": cand.engine,
        "artifact": cand.artifact,
        "format": job.format,
        "config": config.model_dump(mode="json"),
        "seed": config.seed,
        "calibration_samples": job.calibration_samples,
        "torch": torch.__version__,
        "torchao": _torchao_version(),
        "input_sha256": sha256_file(job.model_path),
        "files_sha256": {"model": sha256_file(job.model_path)}
        | {role: sha256_file(path) for role, path in job.files.items()},
        "inputs": [spec.to_dict() for spec in job.loaded.info.inputs],
    }
    if cand.kept_as.compiled_for_cpu:
        info = cpu_info()
        manifest["compiled_on"] = {"cpu": info["model"], "isa": info["isa"], "machine": info["machine"]}
    return manifest


def _snippet(job: Job, cand: Candidate) -> str:
    args = ", ".join(spec.name for spec in job.loaded.info.inputs) or "x"
    text = cand.kept_as.snippet(cand.artifact, cand.engine, args)
    if job.format == "hf":
        text += (
            "# input_ids, attention_mask: tokenizer(texts, padding=True, return_tensors='pt') with the model's\n"
            "# own tokenizer; y is the last hidden state [batch, tokens, hidden].\n"
        )
    return text


def finish(job: Job, cand: Candidate) -> QuantResult:
    """Measure the kept candidate layer by layer, benchmark it (holding the host's benchmark lock) and
    assemble its QuantResult (metrics: docs/architecture.md, "The metrics document")."""
    report, notes = job.report, job.notes
    with quiet():
        report("verifying", 65.0, "measuring the SQNR of each int8 layer")
        per_layer = measure_layers(
            cand.made.layer_probe, cand.check.batches, by_name=job.by_name, notes=notes
        )
        same_build = _same_build(job, cand.made)
        report("benchmarking", 75.0, "timing fp32 and int8")

        def waiting() -> None:
            report("benchmarking", 75.0, "waiting for another benchmark on this host to finish")

        with host_lock(on_wait=waiting) as lock:
            rows = latency(job, cand.int8, same_build, cand.kind)
    waited = job.cache.get(LOCK_WAIT, 0.0) + lock.waited_s  # auto's timing of its candidates waited too
    env = environment(job.config.benchmark.threads) | {
        "engine": cand.engine,
        "bench_lock_wait_s": round(waited, 3),
    }
    if env["load_average"] > (os.cpu_count() or 1):
        notes.append(
            f"the host was busy while benchmarking (load average {env['load_average']}): latencies may be high"
        )
    metrics: dict[str, Any] = {
        "size": sizes(job, cand.path, cand.kind),
        "latency": rows,
        "fidelity": cand.fidelity,
    }
    if cand.accuracy is not None:
        metrics["accuracy"] = cand.accuracy
    metrics |= {
        "layers": {
            "quantized": cand.made.quantized,
            "float": cand.made.float_layers,
            "per_layer": per_layer,
        },
        "environment": env,
        "warnings": notes,
    }
    # report.json and manifest.json are the caller's to write: the worker stores them as artifacts itself.
    report("saving", 95.0, f"hashing {cand.artifact}")
    size = metrics["size"]["int8_bytes"]
    kind = cand.kept_as.file_format
    artifacts = [ArtifactFile(cand.artifact, cand.path, kind, size, sha256_file(cand.path))]
    report("saving", 100.0, "done")
    return QuantResult(cand.backend, artifacts, metrics, _snippet(job, cand), _manifest(job, cand))
