from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from qaas.contract.errors import JOB_CODES, api_codes

T = TypeVar("T")


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer has this shape."""

    model_config = ConfigDict(
        json_schema_extra={"example": {"error": "model_not_found", "detail": "no model with id 'mdl_x': …"}}
    )
    # A description, not an enum: a client generated from the schema must still read a code added later.
    error: str = Field(
        description="Stable snake_case code, safe to branch on; each is explained in docs/errors.md. One of: "
        + ", ".join(f"`{code}`" for code in api_codes())
        + "; `http_<status>` for an HTTP error without a code of its own."
    )
    detail: str = Field(description="What happened and what to do about it.")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = Field(
        None, description="Pass as `cursor` to get the next page; null at the end."
    )


class ObjectError(BaseModel):
    """Why a job or an upload failed (its status says so)."""

    code: str = Field(
        description="Stable snake_case code, safe to branch on; each is explained in docs/errors.md. One of: "
        + ", ".join(f"`{code}`" for code in sorted(JOB_CODES))
        + "."
    )
    message: str = Field(description="What happened and what to do about it.")


class WorkerOut(BaseModel):
    """A worker heard from lately, and the runner protections it gives its jobs."""

    id: str = Field(description="host name:PID")
    last_seen_at: datetime
    concurrency: int
    sandbox: list[str] = Field(description="The runner protections in force.")
    sandbox_gaps: dict[str, Any] = Field(description="Why each missing protection is off.")


class Readiness(BaseModel):
    """GET /readyz. Callers without a valid API key (QAAS_AUTH=required) get `status` alone."""

    status: Literal["ready"]
    database: Literal["ok"] | None = None
    broker: Literal["ok"] | None = None
    workers: list[WorkerOut] | None = None


# What every /v1 route can answer before it runs (app.api.guard): declared on the routers.
GUARDED = (401, 413, 429)


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI `responses` entries declaring the one error schema for the given statuses (422 always)."""
    descriptions = {
        400: "Bad request",
        401: "No API key, or an unknown or revoked one",
        410: "Deleted by the retention policy (QAAS_RETENTION_DAYS)",
        429: "Over a quota, the request rate, or too many wrong API keys from this address: see Retry-After",
        404: "Not found",
        409: "Conflict with the object's state",
        413: "Body larger than QAAS_MAX_UPLOAD_BYTES (uploads) or QAAS_MAX_JSON_BYTES",
        415: "Wrong content type",
        416: "Range not satisfiable",
        422: "The request cannot work: the detail says why",
        503: "Database or broker unavailable",
    }
    codes = sorted(set(statuses) | {422, 503})
    return {code: {"model": ErrorBody, "description": descriptions[code]} for code in codes}
