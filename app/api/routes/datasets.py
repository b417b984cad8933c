from __future__ import annotations

from fastapi import APIRouter, Request, Response, status

from app.api.deps import ReleasingRoute, SessionDep, SettingsDep, StorageDep
from app.api.guard import CallerDep
from app.api.routes.common import CursorQuery, LimitQuery, handle_upload, multipart_body, stored_out
from app.models import Dataset
from app.schemas.common import GUARDED, Page, error_responses
from app.schemas.datasets import DatasetOut
from app.services import datasets as service
from qaas.contract.vocab import UploadStatus

router = APIRouter(
    route_class=ReleasingRoute, prefix="/v1/datasets", tags=["datasets"], responses=error_responses(*GUARDED)
)


def dataset_out(row: Dataset) -> DatasetOut:
    return stored_out(row, DatasetOut)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetOut,
    summary="Upload a dataset",
    responses=error_responses(413, 415),
    openapi_extra=multipart_body(
        {
            "name": {
                "type": "string",
                "description": "A label; defaults to the file name.",
            },
            "preprocess": {
                "type": "string",
                "description": "Image-folder zips only: JSON with resize, crop, mean, std, e.g. "
                '{"resize": 256, "crop": 224}.',
            },
        }
    ),
)
async def upload_dataset(
    request: Request, settings: SettingsDep, storage: StorageDep, caller: CallerDep
) -> DatasetOut:
    """Upload calibration, training or evaluation data: `.npz` or `.safetensors` arrays named after the model's
    inputs (a single input may be `x`) with optional `labels`; an image-folder zip (`<class>/<image>`, with
    `preprocess`); or JSONL text (`{"text": …, "label": …}`) for Hugging Face models. A worker inspects it:
    poll until ready."""
    return await handle_upload(
        request,
        settings,
        storage,
        caller,
        fields={"name", "preprocess"},
        create=service.create_dataset,
        out=DatasetOut,
    )


@router.get("", response_model=Page[DatasetOut], summary="List datasets")
def list_datasets(
    session: SessionDep,
    caller: CallerDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
    status: UploadStatus | None = None,
) -> Page[DatasetOut]:
    """Datasets, newest first, one page at a time."""
    rows, next_cursor = service.list_datasets(
        session, tenant_id=caller.tenant_id, limit=limit, cursor=cursor, status=status
    )
    return Page[DatasetOut](items=[dataset_out(row) for row in rows], next_cursor=next_cursor)


@router.get(
    "/{dataset_id}", response_model=DatasetOut, summary="Get a dataset", responses=error_responses(404)
)
def get_dataset(dataset_id: str, session: SessionDep, caller: CallerDep) -> DatasetOut:
    """One dataset with its tensors and sample count, or the reason it is invalid."""
    return dataset_out(service.get_dataset(session, dataset_id, tenant_id=caller.tenant_id))


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a dataset",
    responses=error_responses(404, 409),
)
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep, caller: CallerDep) -> Response:
    """Deletes the dataset; finished jobs keep their results. 409 while a queued or running job uses it."""
    service.delete_dataset(session, storage, dataset_id, tenant_id=caller.tenant_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
