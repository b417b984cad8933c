from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.common import ObjectError
from qaas.contract.jobs import BackendOption, BenchmarkOptions, JobOptions
from qaas.contract.metrics import JobMetrics
from qaas.contract.vocab import Backend, JobStatus, Mode


def _requires(mode: str, field: str) -> dict[str, Any]:
    """JSON Schema: a `mode` that needs a dataset names it (what create_job refuses with dataset_required)."""
    return {
        "if": {"properties": {"mode": {"const": mode}}, "required": ["mode"]},
        "then": {"required": [field], "properties": {field: {"type": "string"}}},
    }


class JobCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "allOf": [_requires("static", "calibration_dataset_id"), _requires("qat", "train_dataset_id")],
            "examples": [
                {"model_id": "mdl_01jf3k9v2q8x7w6t5r4p3n2m1", "mode": "dynamic", "backend": "fbgemm"},
                {
                    "model_id": "mdl_01jf3k9v2q8x7w6t5r4p3n2m1",
                    "mode": "dynamic",
                    "backend": "auto",
                    "eval_dataset_id": "ds_01jf3k9v2q8x7w6t5r4p3n2m1",
                    "benchmark": {"batch_sizes": [1, 8], "threads": 1, "iterations": 50},
                    "timeout_s": 1800,
                },
            ],
        },
    )
    model_id: str = Field(max_length=40)
    mode: Mode
    backend: BackendOption = Backend.AUTO
    calibration_dataset_id: str | None = Field(None, max_length=40)
    train_dataset_id: str | None = Field(None, max_length=40)
    eval_dataset_id: str | None = Field(None, max_length=40)
    options: JobOptions = Field(default_factory=JobOptions)
    benchmark: BenchmarkOptions = Field(default_factory=BenchmarkOptions)
    timeout_s: int | None = Field(None, ge=10, le=24 * 3600, description="Default: QAAS_JOB_TIMEOUT_S.")


class Progress(BaseModel):
    stage: str | None = Field(
        None, description="loading, calibrating, training, converting, verifying, benchmarking, saving"
    )
    percent: float
    message: str | None = None


class BackendOut(BaseModel):
    requested: Backend
    chosen: str | None = None


class ArtifactOut(BaseModel):
    name: str
    format: str
    size_bytes: int
    sha256: str
    url: str
    expired_at: datetime | None = Field(
        None, description="When the retention policy deleted the file; its download then answers 410."
    )


class JobOut(BaseModel):
    """The whole job (GET /v1/jobs/{id}): lists give a JobSummary."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "job_01jf3k9v2q8x7w6t5r4p3n2m1",
                "model_id": "mdl_01jf3k9v2q8x7w6t5r4p3n2m1",
                "status": "succeeded",
                "mode": "dynamic",
                "backend": {"requested": "auto", "chosen": "fbgemm"},
                "progress": {"stage": "saving", "percent": 100.0, "message": "done"},
                "attempts": 1,
                "artifacts": [
                    {
                        "name": "model.int8.ts",
                        "format": "torchscript",
                        "size_bytes": 289536,
                        "sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                        "url": "/v1/jobs/job_01jf3k9v2q8x7w6t5r4p3n2m1/artifacts/model.int8.ts",
                    }
                ],
            }
        }
    )
    id: str
    model_id: str
    calibration_dataset_id: str | None = None
    train_dataset_id: str | None = None
    eval_dataset_id: str | None = None
    status: JobStatus
    mode: Mode
    backend: BackendOut
    config: dict[str, Any]
    progress: Progress
    attempts: int
    cancel_requested_at: datetime | None = Field(
        None,
        description="Set by POST /cancel; a running job stops within seconds, then its status is cancelled.",
    )
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ObjectError | None = None
    metrics: JobMetrics | None = None
    artifacts: list[ArtifactOut] = Field(default_factory=list)
    load_snippet: str | None = None
    runner: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None
    report_url: str | None = None
    report_html_url: str | None = None


class JobReport(BaseModel):
    """GET /v1/jobs/{id}/report: what a finished job measured (`metrics`, typed), and what it ran."""

    job_id: str
    mode: Mode
    backend: BackendOut
    config: dict[str, Any]
    metrics: JobMetrics
    manifest: dict[str, Any] | None = None


# The headline numbers of a finished job (the JobMetrics columns), as lists show them.
SizeRatio = Annotated[float | None, Field(description="fp32 size / int8 size.")]
Speedup = Annotated[
    float | None,
    Field(description="fp32 p50 / int8 p50 latency at batch 1, or at the first batch size measured."),
]
SqnrDb = Annotated[float | None, Field(description="Output SQNR of int8 against fp32, in dB.")]
AccuracyDelta = Annotated[float | None, Field(description="int8 - fp32 top-1 accuracy, percentage points.")]


class JobSummary(BaseModel):
    """A job in a list (GET /v1/jobs): what it is, how far it got and its headline numbers, a few hundred
    bytes whatever its size. Its `url` (GET /v1/jobs/{id}) has the rest: config, metrics, artifacts,
    manifest, runner, load snippet."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "job_01jf3k9v2q8x7w6t5r4p3n2m1",
                "url": "/v1/jobs/job_01jf3k9v2q8x7w6t5r4p3n2m1",
                "model_id": "mdl_01jf3k9v2q8x7w6t5r4p3n2m1",
                "status": "succeeded",
                "mode": "static",
                "backend": {"requested": "auto", "chosen": "x86"},
                "progress": {"stage": "saving", "percent": 100.0, "message": "done"},
                "attempts": 1,
                "created_at": "2026-11-27T10:00:00Z",
                "started_at": "2026-11-27T10:00:01Z",
                "finished_at": "2026-11-27T10:02:31Z",
                "error": None,
                "size_ratio": 3.971,
                "speedup": 4.412,
                "sqnr_db": 27.3,
                "accuracy_delta": -0.4,
                "report_url": "/v1/jobs/job_01jf3k9v2q8x7w6t5r4p3n2m1/report",
            }
        }
    )
    id: str
    url: str = Field(description="The whole job.")
    model_id: str
    status: JobStatus
    mode: Mode
    backend: BackendOut
    progress: Progress
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ObjectError | None = None
    size_ratio: SizeRatio = None
    speedup: Speedup = None
    sqnr_db: SqnrDb = None
    accuracy_delta: AccuracyDelta = None
    report_url: str | None = Field(None, description="The full metrics (JSON); null until the job has them.")
