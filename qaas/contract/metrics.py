"""The metrics document of a finished job, typed: what the engine measures, the API serves (`JobOut.metrics`,
the report), the client reads as attributes and `qaas.contract.formatting` prints.

Every number is measured on the artifact as stored (docs/architecture.md#the-metrics-document). Unknown keys are kept, never
dropped (a newer worker may add one), and `undeclared()` lists them: the tests require none.

    metrics = JobMetrics.model_validate(job["metrics"])
    metrics.size.ratio, metrics.fidelity.cosine, metrics.first_latency().speedup
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

__all__ = [
    "Accuracy",
    "BackendRow",
    "Environment",
    "Fidelity",
    "JobMetrics",
    "LatencyRow",
    "Layers",
    "Percentiles",
    "Size",
    "Verification",
    "undeclared",
]


class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    # No return annotation: OpenAPI keeps showing the model's own schema.
    @model_serializer(mode="wrap")
    def _as_measured(self, handler: SerializerFunctionWrapHandler):
        """Written back as measured: a key the worker did not write stays absent (no nulls are added)."""
        data = handler(self)
        kept = self.model_fields_set | set(self.model_extra or {})
        return {key: value for key, value in data.items() if key in kept}


class Size(_Doc):
    fp32_bytes: int = Field(description="The uploaded float model's weights and code, in bytes.")
    int8_bytes: int = Field(description="The int8 artifact's file size, in bytes.")
    ratio: float = Field(description="fp32_bytes / int8_bytes.")
    int8_weight_bytes: int | None = Field(None, description="The artifact's weights (packed int8 and float).")
    int8_code_bytes: int | None = Field(None, description="The rest: graph, code, metadata.")


class Percentiles(_Doc):
    p50: float = Field(description="Median latency, ms.")
    p95: float = Field(description="95th percentile latency, ms.")


class LatencyRow(_Doc):
    """fp32 against int8 at one batch size, interleaved on the same inputs, on the worker's CPU."""

    batch_size: int
    threads: int
    fp32_ms: Percentiles
    int8_ms: Percentiles
    speedup: float | None = Field(None, description="fp32 p50 / int8 p50 (fp32 as uploaded, eager).")
    fp32_same_build_ms: Percentiles | None = Field(
        None, description="The float model compiled the way the artifact is (TorchScript or AOTInductor)."
    )
    speedup_same_build: float | None = Field(None, description="fp32 same-build p50 / int8 p50.")


class Fidelity(_Doc):
    """int8 outputs against fp32 outputs on the verification data."""

    sqnr_db: float = Field(description="Signal-to-quantization-noise ratio of the outputs, dB.")
    cosine: float = Field(description="Cosine similarity of the flattened outputs.")
    max_abs_error: float
    top1_agreement: float | None = Field(
        None, description="Share of samples whose arg-max agrees (classifiers)."
    )


class Accuracy(_Doc):
    """Top-1 accuracy on the labelled evaluation (or training) data, percent."""

    fp32: float
    int8: float
    delta: float = Field(description="int8 - fp32, percentage points.")


class LayerError(_Doc):
    name: str
    type: str
    sqnr_db: float = Field(description="The layer's own int8 output against its float output, dB.")


class Layers(_Doc):
    quantized: int = Field(description="Weighted layers that run in int8.")
    float: int = Field(description="Weighted layers kept in float.")
    per_layer: list[LayerError] | None = Field(None, description="Worst first; null where not measurable.")


class Environment(_Doc):
    """Where the benchmark ran."""

    cpu: str
    isa: list[str] = Field(
        description="The int8-relevant instruction sets of the CPU (avx2, avx512_vnni, amx...)."
    )
    torch: str
    engine: str = Field(description="The quantized engine or compiler the int8 model ran on.")
    threads: int
    load_average: float
    bench_lock_wait_s: float | None = None


class Verification(_Doc):
    fresh_process: bool = Field(
        description="The numbers were measured again on the stored file, in a new process."
    )
    batches: int
    samples: int


class BackendRow(_Doc):
    """One of auto's candidates: its measured numbers, or why it failed."""

    int8_ms_p50: float | None = None
    cosine: float | None = None
    artifact: str | None = None
    error: dict[str, Any] | None = None


class JobMetrics(_Doc):
    """The job's report (GET /v1/jobs/{id}/report, `report.json` beside the artifact)."""

    size: Size
    latency: list[LatencyRow]
    fidelity: Fidelity
    accuracy: Accuracy | None = None
    layers: Layers | None = None
    environment: Environment | None = None
    verification: Verification | None = None
    warnings: list[str] = Field(default_factory=list)
    backends: dict[str, BackendRow] | None = Field(None, description="auto: every candidate backend.")
    backend_choice: str | None = Field(None, description="auto: why the kept backend was chosen.")

    def first_latency(self) -> LatencyRow | None:
        """The row at the first batch size measured (batch 1 unless the job asked otherwise)."""
        return self.latency[0] if self.latency else None


def undeclared(document: BaseModel, where: str = "metrics") -> list[str]:
    """The keys of a validated document that no model declares (`metrics.size.extra`), depth first."""
    found = [f"{where}.{key}" for key in document.model_extra or {}]
    for name in type(document).model_fields:
        value = getattr(document, name)
        items = (
            value if isinstance(value, list) else list(value.values()) if isinstance(value, dict) else [value]
        )
        for i, item in enumerate(items):
            if isinstance(item, BaseModel):
                found += undeclared(item, f"{where}.{name}" + (f"[{i}]" if len(items) > 1 else ""))
    return found
