"""Dynamic int8 quantization on fbgemm: int8 weights, activations quantized on the fly.

`.pt2` programs are rebuilt into modules (see rebuild.py), quantized with `quantize_dynamic` and compiled to
TorchScript; TorchScript inputs go through graph mode (`quantize_dynamic_jit`, Linear only). Either way the
artifact is `model.int8.ts`, verified after a reload from disk and benchmarked against the float model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from workers.engine.bench import benchmark, environment
from workers.engine.config import DynamicConfig
from workers.engine.data import check_dataset_matches, inspect_dataset, load_dataset
from workers.engine.errors import EngineError
from workers.engine.io import LoadedModel, load_model
from workers.engine.rebuild import rebuild_modules
from workers.engine.result import ArtifactFile, ProgressFn, QuantResult, atomic_write, sha256_file
from workers.engine.verify import (
    Batch,
    call_model,
    dataset_batches,
    fidelity,
    fixed_batch,
    random_batch,
)

__all__ = ["ENGINE_VERSION", "quantize_dynamic_model"]

ENGINE_VERSION = "0.1"
ARTIFACT = "model.int8.ts"
MIN_COSINE = 0.9
RANDOM_BATCH = 4
NOTHING = "no Linear, LSTM or GRU layer found to quantize dynamically"
NOTHING_HINT = "convolutional models need static quantization (mode static)"


@dataclasses.dataclass
class _Converted:
    """An int8 TorchScript module, its layer counts, and the float model compiled the same way (if any)."""

    module: Any
    quantized: int
    float_layers: int
    float_same_build: Any = None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns that it is deprecated on every call: say it once, in ENGINE_NOTES, not here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*deprecat.*")
        # TorchScript compilation of torch.ao's modules warns about their annotations and .grad reads.
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|ast)(\.|$)")
        yield


def resolve_backend(requested: str) -> str:
    """The backend a dynamic job runs on: fbgemm for "fbgemm" and "auto"; "x86" is not served yet."""
    if requested == "x86":
        raise EngineError(
            "unsupported_combination", "backend x86 comes with the full engine; use fbgemm or auto"
        )
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise EngineError(
            "unsupported_combination", "this worker's torch has no fbgemm engine (x86-64 CPUs only)"
        )
    return "fbgemm"


class _Exclusions:
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


def _convert_program(loaded: LoadedModel, config: DynamicConfig, notes: list[str]) -> _Converted:
    rebuilt = rebuild_modules(loaded.program, embeddings=config.quantize_embeddings)
    notes += rebuilt.warnings
    excluded = _Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {}
    for name, (path, type_name) in rebuilt.layers.items():
        if not excluded(path, name, type_name=type_name):
            qconfigs[name] = (
                torch.ao.quantization.float_qparams_weight_only_qconfig
                if type_name == "Embedding"
                else torch.ao.quantization.default_dynamic_qconfig
            )
    notes += excluded.unused_warnings()
    if not qconfigs:
        why = " (every candidate is excluded)" if rebuilt.layers else ""
        raise EngineError("nothing_quantized", f"{NOTHING}{why}; {NOTHING_HINT}")
    quantized = torch.ao.quantization.quantize_dynamic(rebuilt.module, qconfigs, dtype=torch.qint8)
    count = sum(
        1 for name, m in quantized.named_modules() if name in qconfigs and "quantized" in type(m).__module__
    )
    float_layers = len(rebuilt.layers) - count + len(rebuilt.float_weights)
    try:
        float_same_build = torch.jit.script(rebuilt.module)
    except Exception:
        float_same_build = None  # only a comparison is lost: the benchmark then reports fp32 as uploaded
    try:
        return _Converted(torch.jit.script(quantized), count, float_layers, float_same_build)
    except Exception as exc:
        # Scripting keeps every dimension dynamic; tracing is the fallback and is checked at other batch sizes.
        notes.append(
            f"the int8 model was traced, not scripted ({type(exc).__name__}); check other input shapes"
        )
    specs = loaded.info.inputs
    example = random_batch(specs, fixed_batch(specs) or 2, seed=config.seed)
    traced = torch.jit.trace(quantized, tuple(example.values()), check_trace=False)
    return _Converted(traced, count, float_layers)


def _convert_script(loaded: LoadedModel, config: DynamicConfig, notes: list[str]) -> _Converted:
    if config.quantize_embeddings:
        raise EngineError(
            "unsupported_combination",
            "quantize_embeddings needs a torch.export program (.pt2): TorchScript graph mode quantizes Linear only",
        )
    module = loaded.module
    leaves = {n: m for n, m in module.named_modules() if n and not any(True for _ in m.children())}
    excluded = _Exclusions(config.exclude)
    qconfigs: dict[str, Any] = {"": torch.ao.quantization.default_dynamic_qconfig}
    for name, sub in leaves.items():
        if excluded(name, type_name=sub.original_name):
            qconfigs[name] = None
    notes += excluded.unused_warnings()
    quantized = torch.ao.quantization.quantize_dynamic_jit(module, qconfigs)
    count = sum(1 for node in quantized.inlined_graph.nodes() if node.kind() == "quantized::linear_dynamic")
    weighted = sum(1 for m in leaves.values() if any(True for _ in m.parameters()))
    if count == 0:
        rnn = any(m.original_name in ("LSTM", "GRU") for m in leaves.values())
        hint = (
            "TorchScript graph mode quantizes Linear only: upload a .pt2 for LSTM and GRU"
            if rnn
            else NOTHING_HINT
        )
        raise EngineError("nothing_quantized", f"{NOTHING}; {hint}")
    if any(m.original_name in ("LSTM", "GRU") for m in leaves.values()):
        notes.append(
            "LSTM and GRU layers stay float in TorchScript graph mode: upload a .pt2 to quantize them"
        )
    # The uploaded TorchScript is already the same build as the int8 model: it is its own comparison.
    return _Converted(quantized, count, max(0, weighted - count), loaded.module)


def _verification_batches(
    loaded: LoadedModel, config: DynamicConfig, calibration: Any, eval_data: Any, notes: list[str]
) -> list[Batch]:
    sources = [("evaluation", eval_data), ("calibration", calibration)]
    given = [(role, Path(path)) for role, path in sources if path is not None]
    for role, path in given:
        check_dataset_matches(loaded.info, inspect_dataset(path), role=role)
    specs = loaded.info.inputs
    if given:
        batches = dataset_batches(specs, load_dataset(given[0][1]))
        if batches:
            return batches
    notes.append(
        "no evaluation data given: fidelity is measured on random inputs, which says little about accuracy"
    )
    return [random_batch(specs, fixed_batch(specs) or RANDOM_BATCH, seed=config.seed)]


def _verify(loaded: LoadedModel, int8: Any, batches: list[Batch], seed: int) -> dict[str, Any]:
    by_name = loaded.format == "torchscript"
    specs = loaded.info.inputs
    # The artifact must keep a dynamic batch dimension dynamic: also run it at batch 1 and 3.
    extra = [] if fixed_batch(specs) is not None else [random_batch(specs, n, seed=seed + n) for n in (1, 3)]
    try:
        reference = [call_model(loaded.module, b, by_name=by_name) for b in batches + extra]
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
    if extra:
        fidelity(reference[len(batches) :], candidate[len(batches) :])  # raises when shapes differ
    result = fidelity(reference[: len(batches)], candidate[: len(batches)])
    if result["cosine"] is None or result["cosine"] < MIN_COSINE:
        raise EngineError(
            "verification_failed",
            f"the int8 model's outputs are too far from the float model's (cosine {result['cosine']}, "
            f"SQNR {result['sqnr_db']} dB); keep the most sensitive layers in float with options.exclude",
        )
    return result


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=list))


def _snippet(loaded: LoadedModel, backend: str) -> str:
    args = ", ".join(spec.name for spec in loaded.info.inputs) or "x"
    return (
        "import torch\n"
        f'torch.backends.quantized.engine = "{backend}"\n'
        f'model = torch.jit.load("{ARTIFACT}")\n'
        f"y = model({args})\n"
    )


def _benchmark(
    loaded: LoadedModel, int8: Any, same_build: Any, config: DynamicConfig, notes: list[str]
) -> list[dict[str, Any]]:
    specs, by_name = loaded.info.inputs, loaded.format == "torchscript"
    sizes = list(config.benchmark.batch_sizes)
    fixed = fixed_batch(specs)
    if fixed is not None and sizes != [fixed]:
        notes.append(f"the model has a fixed batch size of {fixed}: benchmarked at {fixed} only")
        sizes = [fixed]
    latency = benchmark(
        lambda b: call_model(loaded.module, b, by_name=by_name),
        lambda b: call_model(int8, b, by_name=by_name),
        lambda size: random_batch(specs, size, seed=config.seed),
        config.benchmark,
        sizes,
        (lambda b: call_model(same_build, b, by_name=by_name)) if same_build is not None else None,
    )
    for row in latency:
        if row["speedup"] < 1:
            notes.append(f"int8 is not faster than fp32 at batch {row['batch_size']} on this CPU")
        elif row.get("speedup_same_build", 1) < 1:
            notes.append(
                f"int8 is not faster than fp32 compiled the same way (TorchScript) at batch {row['batch_size']}"
            )
    return latency


def quantize_dynamic_model(
    model_path: str | Path,
    config: DynamicConfig,
    *,
    out_dir: str | Path,
    input_shapes: Any = None,
    calibration: Any = None,
    eval_data: Any = None,
    progress: ProgressFn | None = None,
) -> QuantResult:
    """Quantize a model dynamically, verify the reloaded artifact, benchmark it; see api.quantize."""
    report = progress or (lambda stage, percent, message: None)
    model_path, out_dir = Path(model_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    backend = resolve_backend(config.backend)
    if config.backend == "auto":
        notes.append(
            "backend auto chose fbgemm, the only backend of this release: no candidates were compared"
        )
    torch.backends.quantized.engine = backend
    report("loading", 0.0, "loading the model")
    loaded = load_model(model_path, input_shapes)
    batches = _verification_batches(loaded, config, calibration, eval_data, notes)
    report("converting", 15.0, "quantizing Linear, LSTM and GRU layers to int8")
    with _quiet():
        convert = _convert_program if loaded.format == "pt2" else _convert_script
        converted = convert(loaded, config, notes)
        report("saving", 45.0, f"writing {ARTIFACT}")
        artifact = atomic_write(out_dir / ARTIFACT, lambda p: torch.jit.save(converted.module, str(p)))
        report("verifying", 55.0, "reloading the artifact from disk and comparing it with the float model")
        try:
            int8 = torch.jit.load(str(artifact), map_location="cpu").eval()
            fid = _verify(loaded, int8, batches, config.seed)
        except BaseException:
            artifact.unlink(missing_ok=True)  # an unverified model must not look like a result
            raise
        report("benchmarking", 70.0, "timing fp32 and int8")
        latency = _benchmark(loaded, int8, converted.float_same_build, config, notes)
    env = environment(config.benchmark.threads)
    if env["load_average"] > (os.cpu_count() or 1):
        notes.append(
            f"the host was busy while benchmarking (load average {env['load_average']}): latencies may be high"
        )
    fp32_bytes, int8_bytes = model_path.stat().st_size, artifact.stat().st_size
    metrics = {
        "size": {
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "ratio": round(fp32_bytes / int8_bytes, 3),
        },
        "latency": latency,
        "fidelity": fid,
        "layers": {"quantized": converted.quantized, "float": converted.float_layers, "per_layer": []},
        "environment": env,
        "warnings": notes,
    }
    manifest = {
        "qaas_engine": ENGINE_VERSION,
        "mode": "dynamic",
        "backend": backend,
        "config": _jsonable(dataclasses.asdict(config)),
        "torch": torch.__version__,
        "input_sha256": sha256_file(model_path),
        "inputs": [spec.to_dict() for spec in loaded.info.inputs],
    }
    # report.json and manifest.json are the caller's to write: the worker stores them as artifacts itself.
    report("saving", 95.0, f"hashing {ARTIFACT}")
    artifacts = [ArtifactFile(ARTIFACT, artifact, "torchscript", int8_bytes, sha256_file(artifact))]
    report("saving", 100.0, "done")
    return QuantResult(backend, artifacts, metrics, _snippet(loaded, backend), manifest)
