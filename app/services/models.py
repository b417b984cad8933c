"""Use cases for uploaded models. No FastAPI here; a use case a route calls commits (app.core.db)."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import after_commit
from app.core.errors import Conflict, InvalidRequest
from app.core.storage import Storage
from app.models import Artifact, Job, Model
from app.services import stored
from app.services.uploads import ReceivedUpload
from qaas.contract.vocab import ACTIVE, UploadStatus


def parse_input_shapes(raw: str | None) -> dict[str, list[int | None]] | None:
    """`input_shapes` form field: JSON object of input name -> shape, null for dynamic dimensions."""
    if raw is None or raw.strip() == "":
        return None
    hint = 'send JSON like {"x": [null, 3, 32, 32]} (null marks a dynamic dimension)'
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"input_shapes is not valid JSON ({exc.msg}): {hint}", code="invalid_input_shapes"
        ) from None
    except RecursionError:  # nested deeper than the parser's stack: no real value is
        raise InvalidRequest(
            f"input_shapes is nested too deeply: {hint}", code="invalid_input_shapes"
        ) from None
    if not isinstance(value, dict) or not value:
        raise InvalidRequest(
            f"input_shapes must be a non-empty JSON object: {hint}", code="invalid_input_shapes"
        )
    for name, shape in value.items():
        if (
            not isinstance(shape, list)
            or len(shape) > 8
            or not all(
                dim is None or (isinstance(dim, int) and not isinstance(dim, bool) and 1 <= dim <= 1_000_000)
                for dim in shape
            )
        ):
            raise InvalidRequest(
                f"input_shapes['{name}'] must be a list of at most 8 positive integers or null: {hint}",
                code="invalid_input_shapes",
            )
    return value


def create_model(session: Session, storage: Storage, upload: ReceivedUpload, tenant_id: str) -> Model:
    """Store the uploaded file under a generated name and queue its inspection (after commit)."""
    input_shapes = parse_input_shapes(upload.fields.get("input_shapes"))
    return stored.record_upload(
        session,
        storage,
        upload,
        Model,
        tenant_id=tenant_id,
        prefix="mdl",
        task=queue.INSPECT_MODEL,
        input_shapes=input_shapes,
    )


def get_model(session: Session, model_id: str, *, tenant_id: str) -> Model:
    return stored.get_stored(session, Model, model_id, tenant_id=tenant_id)


def ready_model(session: Session, model_id: str, *, tenant_id: str) -> Model:
    """The caller's model for a job: refused (409) unless its inspection found it ready."""
    model = get_model(session, model_id, tenant_id=tenant_id)
    if model.status == UploadStatus.EXPIRED:
        raise Conflict(
            f"model {model.id} was deleted by the retention policy: upload it again", code="model_expired"
        )
    if model.status == UploadStatus.INSPECTING:
        raise Conflict(
            f"model {model.id} is still being inspected: poll GET /v1/models/{model.id} until its status is ready",
            code="model_not_ready",
        )
    if model.status == UploadStatus.INVALID:
        raise Conflict(
            f"model {model.id} is invalid ({model.error_message}): upload a corrected model",
            code="model_not_ready",
        )
    assert model.format is not None and model.inspection is not None
    return model


def list_models(
    session: Session, *, tenant_id: str, limit: int, cursor: str | None, status: str | None
) -> tuple[list[Model], str | None]:
    return stored.list_stored(session, Model, tenant_id=tenant_id, limit=limit, cursor=cursor, status=status)


def delete_model(session: Session, storage: Storage, model_id: str, *, tenant_id: str) -> None:
    """Delete the model with its finished jobs and commit; their files go after the commit. Refused while a job
    is in progress."""
    model = get_model(session, model_id, tenant_id=tenant_id)
    active = session.scalar(select(Job.id).where(Job.model_id == model_id, Job.status.in_(ACTIVE)).limit(1))
    if active is not None:
        raise Conflict(
            f"model {model_id} has a job in progress ({active}): cancel it or wait for it to finish, then delete",
            code="model_in_use",
        )
    keys = [model.storage_key]
    for job in session.scalars(select(Job).where(Job.model_id == model_id)):
        keys.extend(session.scalars(select(Artifact.storage_key).where(Artifact.job_id == job.id)))
        session.delete(job)
    session.flush()
    session.delete(model)

    def delete_files() -> None:
        for key in keys:
            storage.delete(key)

    after_commit(session, delete_files)
    session.commit()


def record_inspection(
    session: Session, model_id: str, *, result: dict[str, Any] | None, error: tuple[str, str] | None
) -> None:
    def apply(model: Model, found: dict[str, Any]) -> None:
        model.inspection = {
            key: found[key] for key in ("inputs", "parameters", "layers", "hf") if key in found
        }

    stored.record_inspection(session, Model, model_id, result=result, error=error, apply=apply)
