"""Use cases for uploaded models. No FastAPI here: routes call these inside one transaction."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import after_commit
from app.core.errors import Conflict, InvalidRequest, not_found
from app.core.ids import new_id
from app.core.storage import LocalStorage
from app.models import Artifact, Job, Model
from app.services.pagination import paginate
from app.services.uploads import ReceivedUpload

ACTIVE_JOB_STATUSES = ("queued", "running")


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


def create_model(session: Session, storage: LocalStorage, upload: ReceivedUpload) -> Model:
    """Store the uploaded file under a generated name and queue its inspection (after commit)."""
    assert upload.file is not None
    input_shapes = parse_input_shapes(upload.fields.get("input_shapes"))
    model_id = new_id("mdl")
    key = f"uploads/{model_id}.bin"
    storage.commit(upload.file.tmp_path, key)
    model = Model(
        id=model_id,
        name=(upload.fields.get("name") or upload.file.filename)[:200],
        size_bytes=upload.file.size_bytes,
        sha256=upload.file.sha256,
        storage_key=key,
        status="inspecting",
        input_shapes=input_shapes,
    )
    session.add(model)
    session.flush()
    after_commit(session, lambda: queue.enqueue(queue.INSPECT_MODEL, model_id))
    return model


def get_model(session: Session, model_id: str) -> Model:
    model = session.get(Model, model_id)
    if model is None:
        raise not_found("model", model_id)
    return model


def list_models(
    session: Session, *, limit: int, cursor: str | None, status: str | None
) -> tuple[list[Model], str | None]:
    query = select(Model)
    if status:
        query = query.where(Model.status == status)
    return paginate(session, query, Model.id, limit, cursor)


def delete_model(session: Session, storage: LocalStorage, model_id: str) -> None:
    """Delete the model with its finished jobs and their artifacts; refused while a job is in progress."""
    model = get_model(session, model_id)
    active = session.scalar(
        select(Job.id).where(Job.model_id == model_id, Job.status.in_(ACTIVE_JOB_STATUSES)).limit(1)
    )
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
    after_commit(session, lambda: [storage.delete(key) for key in keys])


def record_inspection(
    session: Session, model_id: str, *, result: dict[str, Any] | None, error: tuple[str, str] | None
) -> None:
    """Worker side: store what the runner found. Only an `inspecting` model changes."""
    model = session.get(Model, model_id, with_for_update=True)
    if model is None or model.status != "inspecting":
        return
    if error is not None:
        model.status = "invalid"
        model.error_code, model.error_message = error
        return
    assert result is not None
    model.status = "ready"
    model.format = result.get("format")
    model.inspection = {key: result[key] for key in ("inputs", "parameters", "layers")}
