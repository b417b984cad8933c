"""Use cases for uploaded datasets. The API reads no dataset itself: a runner inspects it."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from app.core import queue
from app.core.db import after_commit
from app.core.errors import Conflict, InvalidRequest
from app.core.storage import Storage
from app.models import Dataset, Job
from app.services import stored
from app.services.uploads import ReceivedUpload
from qaas.contract.vocab import ACTIVE, DataRole, UploadStatus

_DATASET_COLUMNS = (Job.calibration_dataset_id, Job.train_dataset_id, Job.eval_dataset_id)


def parse_preprocess(raw: str | None) -> dict[str, Any] | None:
    if raw is None or raw.strip() == "":
        return None
    hint = 'send JSON like {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}'
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(
            f"preprocess is not valid JSON ({exc.msg}): {hint}", code="invalid_preprocess"
        ) from None
    except RecursionError:  # nested deeper than the parser's stack: no real value is
        raise InvalidRequest(f"preprocess is nested too deeply: {hint}", code="invalid_preprocess") from None
    allowed = {"resize", "crop", "mean", "std"}
    if not isinstance(value, dict) or not set(value) <= allowed:
        raise InvalidRequest(
            f"preprocess must be an object with keys among {sorted(allowed)}: {hint}",
            code="invalid_preprocess",
        )
    return value


def create_dataset(session: Session, storage: Storage, upload: ReceivedUpload, tenant_id: str) -> Dataset:
    """Store the uploaded file under a generated name and queue its inspection (after commit)."""
    preprocess = parse_preprocess(upload.fields.get("preprocess"))
    return stored.record_upload(
        session,
        storage,
        upload,
        Dataset,
        tenant_id=tenant_id,
        prefix="ds",
        task=queue.INSPECT_DATASET,
        preprocess=preprocess,
    )


def get_dataset(session: Session, dataset_id: str, *, tenant_id: str) -> Dataset:
    return stored.get_stored(session, Dataset, dataset_id, tenant_id=tenant_id)


def ready_dataset(session: Session, dataset_id: str, role: DataRole, *, tenant_id: str) -> Dataset:
    """The caller's dataset for a job's `role`: refused (409) unless its inspection found it ready."""
    dataset = get_dataset(session, dataset_id, tenant_id=tenant_id)
    if dataset.status == UploadStatus.INSPECTING:
        raise Conflict(
            f"the {role} dataset {dataset_id} is still being inspected: poll GET /v1/datasets/{dataset_id} "
            "until it is ready",
            code="dataset_not_ready",
        )
    if dataset.status == UploadStatus.EXPIRED:
        raise Conflict(
            f"the {role} dataset {dataset_id} was deleted by the retention policy: upload it again",
            code="dataset_expired",
        )
    if dataset.status == UploadStatus.INVALID:
        raise Conflict(
            f"the {role} dataset {dataset_id} is invalid ({dataset.error_message}): upload a corrected file",
            code="dataset_not_ready",
        )
    return dataset


def list_datasets(
    session: Session, *, tenant_id: str, limit: int, cursor: str | None, status: str | None
) -> tuple[list[Dataset], str | None]:
    return stored.list_stored(
        session, Dataset, tenant_id=tenant_id, limit=limit, cursor=cursor, status=status
    )


def delete_dataset(session: Session, storage: Storage, dataset_id: str, *, tenant_id: str) -> None:
    """Delete the dataset and commit (its file goes after the commit); finished jobs keep their results and
    lose the reference. Refused while in use."""
    dataset = get_dataset(session, dataset_id, tenant_id=tenant_id)
    uses = or_(*(column == dataset_id for column in _DATASET_COLUMNS))
    active = session.scalar(select(Job.id).where(uses, Job.status.in_(ACTIVE)).limit(1))
    if active is not None:
        raise Conflict(
            f"dataset {dataset_id} is used by a job in progress ({active}): cancel it or wait, then delete",
            code="dataset_in_use",
        )
    for column in _DATASET_COLUMNS:
        session.execute(update(Job).where(column == dataset_id).values({column.key: None}))
    key = dataset.storage_key
    session.delete(dataset)
    after_commit(session, lambda: storage.delete(key))
    session.commit()


def record_inspection(
    session: Session, dataset_id: str, *, result: dict[str, Any] | None, error: tuple[str, str] | None
) -> None:
    def apply(dataset: Dataset, found: dict[str, Any]) -> None:
        dataset.num_samples = found.get("num_samples")
        dataset.tensors = found.get("tensors")
        dataset.has_labels = bool(found.get("has_labels"))
        dataset.classes = found.get("classes")

    stored.record_inspection(session, Dataset, dataset_id, result=result, error=error, apply=apply)
