from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.jobs import BackendOut, JobStatus, Mode


class ModelJobOut(BaseModel):
    """One job of a model, reduced to the numbers that compare jobs (the JobMetrics headline columns)."""

    model_config = ConfigDict(
        json_schema_extra={
            "example": {
                "id": "job_01jf3k9v2q8x7w6t5r4p3n2m1",
                "status": "succeeded",
                "mode": "static",
                "backend": {"requested": "auto", "chosen": "x86"},
                "error_code": None,
                "fp32_bytes": 46830571,
                "int8_bytes": 11792385,
                "size_ratio": 3.971,
                "speedup": 4.412,
                "sqnr_db": 27.3,
                "cosine": 0.99902,
                "accuracy_delta": -0.4,
                "created_at": "2026-11-27T10:00:00Z",
                "finished_at": "2026-11-27T10:02:31Z",
                "url": "/v1/jobs/job_01jf3k9v2q8x7w6t5r4p3n2m1",
                "report_url": "/v1/jobs/job_01jf3k9v2q8x7w6t5r4p3n2m1/report",
                "report_html_url": "/v1/jobs/job_01jf3k9v2q8x7w6t5r4p3n2m1/report.html",
            }
        }
    )
    id: str
    status: JobStatus
    mode: Mode
    backend: BackendOut
    error_code: str | None = Field(None, description="The job's failure code, when it failed.")
    fp32_bytes: int | None = None
    int8_bytes: int | None = None
    size_ratio: float | None = Field(None, description="fp32 size / int8 size.")
    speedup: float | None = Field(
        None, description="fp32 p50 / int8 p50 latency at batch 1, or at the first batch size measured."
    )
    sqnr_db: float | None = Field(None, description="Output SQNR of int8 against fp32, in dB.")
    cosine: float | None = Field(None, description="Output cosine similarity of int8 against fp32.")
    accuracy_delta: float | None = Field(None, description="int8 - fp32 top-1 accuracy, percentage points.")
    created_at: datetime
    finished_at: datetime | None = None
    url: str
    report_url: str | None = Field(None, description="The full metrics (JSON); null until the job has them.")
    report_html_url: str | None = Field(None, description="The report page; null until the job has metrics.")
