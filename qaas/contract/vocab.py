"""The domain's words, defined once: job statuses, upload statuses, modes, model formats, backends, data roles.

Each is a `StrEnum`, so a member is its string (`JobStatus.QUEUED == "queued"`, JSON writes "queued") and the
database, the wire and old code that compares strings all keep working. Pure Python: every layer imports it.

    from qaas.contract.vocab import ACTIVE, JobStatus
    if job.status in ACTIVE: ...
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

__all__ = [
    "ACTIVE",
    "Backend",
    "DataRole",
    "Format",
    "JobStatus",
    "Mode",
    "ROLE_WORDS",
    "TERMINAL",
    "UploadStatus",
]


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job that a worker may still pick up or is running; a job that will not change again.
ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class UploadStatus(StrEnum):
    """A model's or a dataset's: `inspecting` until a runner has read it, then `ready` or `invalid`;
    `expired` once the retention policy deleted its file."""

    INSPECTING = "inspecting"
    READY = "ready"
    INVALID = "invalid"
    EXPIRED = "expired"


class Mode(StrEnum):
    DYNAMIC = "dynamic"
    STATIC = "static"
    QAT = "qat"


class Format(StrEnum):
    """An uploaded model's format: a torch.export program, a TorchScript archive, a Hugging Face folder."""

    PT2 = "pt2"
    TORCHSCRIPT = "torchscript"
    HF = "hf"


class Backend(StrEnum):
    """The int8 backends (each declared in qaas.contract.backends), and `auto`: try the candidates, keep one."""

    FBGEMM = "fbgemm"
    X86 = "x86"
    AUTO = "auto"


class DataRole(StrEnum):
    """What a job uses a dataset for."""

    CALIBRATION = "calibration"
    EVAL = "eval"
    TRAIN = "train"


# The word for a role's dataset in messages ("the evaluation dataset").
ROLE_WORDS: Mapping[str, str] = {
    DataRole.EVAL: "evaluation",
    DataRole.CALIBRATION: "calibration",
    DataRole.TRAIN: "training",
}
