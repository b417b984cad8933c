"""What the API answers, as small frozen records: `Model`, `Dataset`, `Job` (its `metrics` typed by the job
contract) and `JobSummary` from the job lists. Each keeps the JSON it came from in `.raw` and reads like it
(`job["status"]`, `job.get("metrics")`), as the dicts earlier versions of the client returned.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from qaas.contract.metrics import JobMetrics
from qaas.contract.vocab import TERMINAL

__all__ = ["Artifact", "Dataset", "Error", "Job", "JobSummary", "Model", "Progress"]


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _metrics(value: Any) -> JobMetrics | None:
    """The job's metrics document, typed (`job.metrics.size.ratio`); `job["metrics"]` keeps the JSON."""
    return JobMetrics.model_validate(value) if value else None


class _Json(Mapping[str, Any]):
    """Reads like the JSON it came from: `obj["key"]`, `obj.get("key")`, `dict(obj)`."""

    raw: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.raw[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.raw)

    def __len__(self) -> int:
        return len(self.raw)


@dataclass(frozen=True, eq=False)
class Error:
    """Why a job failed or an upload is invalid: a stable `code` and a `message` that says what to do."""

    code: str
    message: str

    @classmethod
    def of(cls, value: Any) -> Error | None:
        return cls(value["code"], value.get("message") or "") if value else None


@dataclass(frozen=True, eq=False)
class Model(_Json):
    id: str
    name: str
    status: str  # inspecting, ready, invalid, expired
    format: str | None
    size_bytes: int
    sha256: str
    inspection: dict[str, Any] | None  # inputs [{name, shape, dtype}], parameters, layers by type
    error: Error | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Model:
        return cls(
            raw["id"], raw.get("name", ""), raw["status"], raw.get("format"), raw.get("size_bytes", 0),
            raw.get("sha256", ""), raw.get("inspection"), Error.of(raw.get("error")), raw,
        )  # fmt: skip


@dataclass(frozen=True, eq=False)
class Dataset(_Json):
    id: str
    name: str
    status: str  # inspecting, ready, invalid, expired
    format: str | None
    size_bytes: int
    sha256: str
    num_samples: int | None
    tensors: dict[str, Any] | None  # {name: {shape, dtype}}
    has_labels: bool | None
    error: Error | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Dataset:
        return cls(
            raw["id"], raw.get("name", ""), raw["status"], raw.get("format"), raw.get("size_bytes", 0),
            raw.get("sha256", ""), raw.get("num_samples"), raw.get("tensors"), raw.get("has_labels"), Error.of(raw.get("error")), raw,
        )  # fmt: skip


@dataclass(frozen=True)
class Progress:
    stage: str | None  # loading, calibrating, training, converting, verifying, benchmarking, saving
    percent: float
    message: str | None

    @classmethod
    def of(cls, value: Any) -> Progress:
        value = value or {}
        return cls(value.get("stage"), float(value.get("percent") or 0), value.get("message"))


@dataclass(frozen=True)
class Artifact:
    name: str
    format: str
    size_bytes: int
    sha256: str
    url: str


@dataclass(frozen=True, eq=False)
class Job(_Json):
    id: str
    model_id: str
    status: str  # queued, running, succeeded, failed, cancelled
    mode: str
    backend: str  # as asked: auto, fbgemm, x86
    backend_chosen: str | None
    progress: Progress
    # size, latency, fidelity, accuracy, layers, warnings: docs/architecture.md#the-metrics-document
    metrics: JobMetrics | None = field(repr=False)
    artifacts: tuple[Artifact, ...]
    error: Error | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        backend = raw.get("backend") or {}
        artifacts = tuple(
            Artifact(a["name"], a.get("format", ""), a.get("size_bytes", 0), a["sha256"], a.get("url", ""))
            for a in raw.get("artifacts") or []
        )
        return cls(
            raw["id"], raw.get("model_id", ""), raw["status"], raw.get("mode", ""),
            backend.get("requested", ""), backend.get("chosen"), Progress.of(raw.get("progress")),
            _metrics(raw.get("metrics")), artifacts, Error.of(raw.get("error")),
            _time(raw.get("created_at")), _time(raw.get("started_at")), _time(raw.get("finished_at")), raw,
        )  # fmt: skip

    @property
    def done(self) -> bool:
        """Succeeded, failed or cancelled: the job will not change any more."""
        return self.status in TERMINAL

    def artifact(self, name: str) -> Artifact:
        for artifact in self.artifacts:
            if artifact.name == name:
                return artifact
        names = ", ".join(a.name for a in self.artifacts) or "none yet"
        raise KeyError(f"job {self.id} has no artifact {name!r} (it has: {names})")


@dataclass(frozen=True, eq=False)
class JobSummary(_Json):
    """A job as lists give it (`Client.jobs`): no config, metrics or artifacts, but the headline numbers.
    `Client.job(summary)` fetches the whole job."""

    id: str
    model_id: str
    status: str  # queued, running, succeeded, failed, cancelled
    mode: str
    backend: str  # as asked: auto, fbgemm, x86
    backend_chosen: str | None
    progress: Progress
    error: Error | None
    size_ratio: float | None  # fp32 size / int8 size
    speedup: float | None  # fp32 / int8 p50 latency at the first batch size measured
    sqnr_db: float | None
    created_at: datetime | None
    finished_at: datetime | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobSummary:
        backend = raw.get("backend") or {}
        return cls(
            raw["id"], raw.get("model_id", ""), raw["status"], raw.get("mode", ""),
            backend.get("requested", ""), backend.get("chosen"), Progress.of(raw.get("progress")),
            Error.of(raw.get("error")), raw.get("size_ratio"), raw.get("speedup"), raw.get("sqnr_db"),
            _time(raw.get("created_at")), _time(raw.get("finished_at")), raw,
        )  # fmt: skip

    @property
    def done(self) -> bool:
        """Succeeded, failed or cancelled: the job will not change any more."""
        return self.status in TERMINAL
