"""The tail every quantization mode shares: write the artifact, reload it, verify, measure, report.

A handler opens a `Job` (backend, model, data files checked against the model's inputs), makes an int8
TorchScript module its own way, and hands it to `finish`, which writes `model.int8.ts` atomically, reloads it
from disk, compares it with the float model on evaluation data, calibration data or generated inputs, scores
accuracy when the data has labels, times fp32 against int8 and returns the QuantResult.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workers.engine.bench import benchmark, environment
from workers.engine.data import check_dataset_matches, inspect_dataset, load_dataset
from workers.engine.errors import EngineError
from workers.engine.io import LoadedModel, load_model
from workers.engine.result import ArtifactFile, ProgressFn, QuantResult, atomic_write, sha256_file
from workers.engine.shapes import LABELS
from workers.engine.verify import (
    Batch,
    call_model,
    dataset_batches,
    fidelity,
    fixed_batch,
    flat_outputs,
    random_batch,
)

__all__ = ["ARTIFACT", "ENGINE_VERSION", "Exclusions", "Int8Model", "Job", "finish", "quiet", "start_job"]

ENGINE_VERSION = "0.1"
ARTIFACT = "model.int8.ts"
MIN_COSINE = 0.9
RANDOM_BATCH = 4
ACCURACY_BATCH = 64
MAX_ACCURACY_SAMPLES = 10_000
# Data roles: the manifest's key, and the word for the dataset in messages.
ROLES = {"eval": "evaluation", "calibration": "calibration", "train": "training"}
QUANTIZED_OP = re.compile(r"quantized::(conv|linear|batch_norm|embedding)\w*")
FLOAT_OPS = {
    f"aten::{op}"
    for op in (
        "linear", "conv1d", "conv2d", "conv3d", "_convolution", "conv_transpose1d", "conv_transpose2d",
        "batch_norm", "layer_norm", "group_norm", "embedding", "lstm", "gru", "addmm",
    )
}  # fmt: skip


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call: say it once, in ENGINE_NOTES, not here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecat.*")
        # TorchScript compilation of torch.ao's modules warns about their annotations and .grad reads.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|ast)(\.|$)")
        yield


class Exclusions:
    """Matches layers against config.exclude (a layer path, its module name, a path prefix or a type name)."""

    def __init__(self, entries: tuple[str, ...]) -> None:
        self.entries = entries
        self.used: set[str] = set()

    def __call__(self, *names: str, type_name: str) -> bool:
        for entry in self.entries:
            if entry == type_name or any(n and (n == entry or n.startswith(entry + ".")) for n in names):
                self.used.add(entry)
                return True
        return False

    def unused_warnings(self) -> list[str]:
        return [f"exclude entry '{e}' matched no layer" for e in self.entries if e not in self.used]


@dataclasses.dataclass
class Int8Model:
    """What a handler made: the int8 TorchScript module and its layer counts.

    `float_same_build` is the float model compiled the same way (TorchScript), for an honest speedup;
    `reference`, when set, is what the verification gate compares the int8 model with instead of the uploaded
    float model (QAT: the trained fake-quantized model, since training moves the outputs on purpose).
    """

    module: Any
    quantized: int
    float_layers: int
    float_same_build: Any = None
    reference: Any = None


@dataclasses.dataclass
class Job:
    """One quantization run: the loaded model, its data files by role, and the warnings collected so far."""

    mode: str
    config: Any
    model_path: Path
    out_dir: Path
    loaded: LoadedModel
    backend: str
    report: ProgressFn
    files: dict[str, Path]
    notes: list[str]
    calibration_samples: int = 0
    _arrays: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)

    @property
    def by_name(self) -> bool:
        """TorchScript is called with keyword inputs, programs positionally."""
        return self.loaded.format == "torchscript"

    def arrays(self, role: str) -> dict[str, np.ndarray]:
        """The arrays of the dataset given for a role ("eval", "calibration", "train"), loaded once."""
        if role not in self._arrays:
            self._arrays[role] = load_dataset(self.files[role])
        return self._arrays[role]

    def has_labels(self, role: str) -> bool:
        return role in self.files and inspect_dataset(self.files[role]).has_labels

    def batches(self, role: str, **options: Any) -> list[Batch]:
        """Model batches of a role's dataset (see verify.dataset_batches for the options)."""
        return dataset_batches(self.loaded.info.inputs, self.arrays(role), **options)


def resolve_backend(requested: str) -> str:
    """The backend a job runs on: fbgemm for "fbgemm" and "auto"; "x86" is not served yet."""
    if requested == "x86":
        raise EngineError(
            "unsupported_combination", "backend x86 comes with the full engine; use fbgemm or auto"
        )
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise EngineError(
            "unsupported_combination", "this worker's torch has no fbgemm engine (x86-64 CPUs only)"
        )
    return "fbgemm"


def start_job(
    mode: str,
    model_path: str | Path,
    config: Any,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    data: dict[str, Any],
    progress: ProgressFn | None = None,
) -> Job:
    """Resolve the backend, load the model and check every given dataset against its inputs.

    Args:
        data: dataset paths by role ("eval", "calibration", "train"); None values are ignored.

    Raises:
        EngineError: unsupported_combination, any load_model code, dataset_mismatch.
    """
    report = progress or (lambda stage, percent, message: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    backend = resolve_backend(config.backend)
    if config.backend == "auto":
        notes.append(
            "backend auto chose fbgemm, the only backend of this release: no candidates were compared"
        )
    torch.backends.quantized.engine = backend
    report("loading", 0.0, "loading the model")
    loaded = load_model(Path(model_path), input_shapes)
    files = {role: Path(path) for role, path in data.items() if path is not None}
    for role, path in files.items():
        check_dataset_matches(loaded.info, inspect_dataset(path), role=ROLES[role])
    return Job(mode, config, Path(model_path), out, loaded, backend, report, files, notes)


def count_layers(module: Any) -> tuple[int, int]:
    """(quantized, float) weighted layers of a TorchScript module, read from its inlined graph."""
    kinds = [node.kind() for node in module.inlined_graph.nodes()]
    quantized = sum(1 for k in kinds if QUANTIZED_OP.fullmatch(k) and "pack" not in k)
    return quantized, sum(1 for k in kinds if k in FLOAT_OPS)


def _verification_batches(job: Job) -> list[Batch]:
    for role in ("eval", "calibration", "train"):
        if role in job.files:
            batches = job.batches(role)
            if batches:
                return batches
    job.notes.append(
        "no evaluation data given: fidelity is measured on random inputs, which says little about accuracy"
    )
    specs = job.loaded.info.inputs
    return [random_batch(specs, fixed_batch(specs) or RANDOM_BATCH, seed=job.config.seed)]


def _verify(job: Job, int8: Any, reference: Any, batches: list[Batch]) -> dict[str, Any]:
    specs, by_name, seed = job.loaded.info.inputs, job.by_name, job.config.seed
    # The artifact must keep a dynamic batch dimension dynamic: also run it at batch 1 and 3.
    extra = [] if fixed_batch(specs) is not None else [random_batch(specs, n, seed=seed + n) for n in (1, 3)]
    try:
        floats = [call_model(job.loaded.module, b, by_name=by_name) for b in batches + extra]
        gate = floats if reference is None else [call_model(reference, b, by_name=by_name) for b in batches]
    except Exception as exc:
        raise EngineError(
            "verification_failed",
            f"the float model fails on the verification inputs ({type(exc).__name__}: {exc}); "
            "check input_shapes or the evaluation data",
        ) from exc
    try:
        candidate = [call_model(int8, b, by_name=by_name) for b in batches + extra]
    except Exception as exc:
        raise EngineError(
            "verification_failed",
            f"the int8 model reloaded from disk failed to run ({type(exc).__name__}: {exc})",
        ) from exc
    n = len(batches)
    if extra:
        fidelity(floats[n:], candidate[n:])  # raises when shapes differ
    result = fidelity(floats[:n], candidate[:n])
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


def _accuracy(job: Job, int8: Any) -> dict[str, float] | None:
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
    return {"fp32": round(fp32, 3), "int8": round(int8_acc, 3), "delta": round(int8_acc - fp32, 3)}


def _benchmark(job: Job, int8: Any, same_build: Any) -> list[dict[str, Any]]:
    specs, by_name, config = job.loaded.info.inputs, job.by_name, job.config
    sizes = list(config.benchmark.batch_sizes)
    fixed = fixed_batch(specs)
    if fixed is not None and sizes != [fixed]:
        job.notes.append(f"the model has a fixed batch size of {fixed}: benchmarked at {fixed} only")
        sizes = [fixed]
    latency = benchmark(
        lambda b: call_model(job.loaded.module, b, by_name=by_name),
        lambda b: call_model(int8, b, by_name=by_name),
        lambda size: random_batch(specs, size, seed=config.seed),
        config.benchmark,
        sizes,
        (lambda b: call_model(same_build, b, by_name=by_name)) if same_build is not None else None,
    )
    for row in latency:
        if row["speedup"] < 1:
            job.notes.append(f"int8 is not faster than fp32 at batch {row['batch_size']} on this CPU")
        elif row.get("speedup_same_build", 1) < 1:
            job.notes.append(
                f"int8 is not faster than fp32 compiled the same way (TorchScript) at batch {row['batch_size']}"
            )
    return latency


def _size(model_path: Path, artifact: Path) -> dict[str, Any]:
    fp32_bytes, int8_bytes = model_path.stat().st_size, artifact.stat().st_size
    weights = code = 0
    with zipfile.ZipFile(artifact) as zf:  # TorchScript: tensors under data/, (compressed) code under code/
        for info in zf.infolist():
            part = info.filename.split("/")[1] if "/" in info.filename else ""
            weights += info.compress_size if part == "data" else 0
            code += info.compress_size if part == "code" else 0
    return {
        "fp32_bytes": fp32_bytes,
        "int8_bytes": int8_bytes,
        "ratio": round(fp32_bytes / int8_bytes, 3),
        "int8_weight_bytes": weights,
        "int8_code_bytes": code,
    }


def _torchao_version() -> str | None:
    if importlib.util.find_spec("torchao") is None:
        return None
    try:
        return importlib.metadata.version("torchao")  # the version, without importing torchao's kernels
    except importlib.metadata.PackageNotFoundError:
        return None


def _manifest(job: Job) -> dict[str, Any]:
    config = job.config
    return {
        "qaas_engine": ENGINE_VERSION,
        "mode": job.mode,
        "backend": job.backend,
        "engine": torch.backends.quantized.engine,
        "config": json.loads(json.dumps(dataclasses.asdict(config), default=list)),
        "seed": config.seed,
        "calibration_samples": job.calibration_samples,
        "torch": torch.__version__,
        "torchao": _torchao_version(),
        "input_sha256": sha256_file(job.model_path),
        "files_sha256": {"model": sha256_file(job.model_path)}
        | {role: sha256_file(path) for role, path in job.files.items()},
        "inputs": [spec.to_dict() for spec in job.loaded.info.inputs],
    }


def _snippet(job: Job) -> str:
    args = ", ".join(spec.name for spec in job.loaded.info.inputs) or "x"
    return (
        "import torch\n"
        f'torch.backends.quantized.engine = "{job.backend}"\n'
        f'model = torch.jit.load("{ARTIFACT}")\n'
        f"y = model({args})\n"
    )


def finish(job: Job, made: Int8Model) -> QuantResult:
    """Write the artifact, reload it from disk, verify, score, benchmark; the QuantResult of the job.

    Raises:
        EngineError: verification_failed (the artifact is removed), dataset_mismatch.
    """
    report, notes = job.report, job.notes
    batches = _verification_batches(job)
    with quiet():
        report("saving", 45.0, f"writing {ARTIFACT}")
        artifact = atomic_write(job.out_dir / ARTIFACT, lambda p: torch.jit.save(made.module, str(p)))
        report("verifying", 55.0, "reloading the artifact from disk and comparing it with the float model")
        try:
            int8 = torch.jit.load(str(artifact), map_location="cpu").eval()
            fid = _verify(job, int8, made.reference, batches)
            accuracy = _accuracy(job, int8)
        except BaseException:
            artifact.unlink(missing_ok=True)  # an unverified model must not look like a result
            raise
        report("benchmarking", 70.0, "timing fp32 and int8")
        latency = _benchmark(job, int8, made.float_same_build)
    env = environment(job.config.benchmark.threads)
    if env["load_average"] > (os.cpu_count() or 1):
        notes.append(
            f"the host was busy while benchmarking (load average {env['load_average']}): latencies may be high"
        )
    metrics: dict[str, Any] = {"size": _size(job.model_path, artifact), "latency": latency, "fidelity": fid}
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    metrics |= {
        "layers": {"quantized": made.quantized, "float": made.float_layers, "per_layer": []},
        "environment": env,
        "warnings": notes,
    }
    # report.json and manifest.json are the caller's to write: the worker stores them as artifacts itself.
    report("saving", 95.0, f"hashing {ARTIFACT}")
    size = metrics["size"]["int8_bytes"]
    artifacts = [ArtifactFile(ARTIFACT, artifact, "torchscript", size, sha256_file(artifact))]
    report("saving", 100.0, "done")
    return QuantResult(job.backend, artifacts, metrics, _snippet(job), _manifest(job))
