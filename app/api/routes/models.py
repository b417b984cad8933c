from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import FileResponse

from app.api.deps import ReleasingRoute, SessionDep, SettingsDep, StorageDep
from app.api.guard import CallerDep
from app.api.routes.common import (
    CursorQuery,
    LimitQuery,
    file_response,
    handle_upload,
    multipart_body,
    stored_out,
)
from app.core.errors import Gone
from app.models import Model
from app.schemas.common import GUARDED, Page, error_responses
from app.schemas.models import ModelOut
from app.services import models as service
from qaas.contract.vocab import UploadStatus

router = APIRouter(
    route_class=ReleasingRoute, prefix="/v1/models", tags=["models"], responses=error_responses(*GUARDED)
)


def model_out(row: Model) -> ModelOut:
    return stored_out(row, ModelOut)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=ModelOut,
    summary="Upload a model",
    responses=error_responses(413, 415),
    openapi_extra=multipart_body(
        {
            "name": {
                "type": "string",
                "description": "A label; defaults to the file name.",
            },
            "input_shapes": {
                "type": "string",
                "description": "TorchScript only: JSON object of input name to shape, null for dynamic "
                'dimensions, e.g. {"x": [null, 3, 224, 224]}.',
            },
        }
    ),
)
async def upload_model(
    request: Request, settings: SettingsDep, storage: StorageDep, caller: CallerDep
) -> ModelOut:
    """Upload a torch.export program (.pt2), a TorchScript archive (with `input_shapes`) or a zipped Hugging
    Face model folder (config.json + safetensors). A worker inspects it: poll until `status` is `ready` (or
    `invalid`, with `error` saying why)."""
    return await handle_upload(
        request,
        settings,
        storage,
        caller,
        fields={"name", "input_shapes"},
        create=service.create_model,
        out=ModelOut,
    )


@router.get("", response_model=Page[ModelOut], summary="List models")
def list_models(
    session: SessionDep,
    caller: CallerDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
    status: UploadStatus | None = None,
) -> Page[ModelOut]:
    """Models, newest first, one page at a time."""
    rows, next_cursor = service.list_models(
        session, tenant_id=caller.tenant_id, limit=limit, cursor=cursor, status=status
    )
    return Page[ModelOut](items=[model_out(row) for row in rows], next_cursor=next_cursor)


@router.get("/{model_id}", response_model=ModelOut, summary="Get a model", responses=error_responses(404))
def get_model(model_id: str, session: SessionDep, caller: CallerDep) -> ModelOut:
    """One model with its inspection (inputs, parameters, layers) or the reason it is invalid."""
    return model_out(service.get_model(session, model_id, tenant_id=caller.tenant_id))


@router.get(
    "/{model_id}/file",
    summary="Download the uploaded model file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **error_responses(400, 404, 410, 416)},
)
def download_model_file(
    model_id: str, request: Request, session: SessionDep, storage: StorageDep, caller: CallerDep
) -> Response:
    """The file exactly as uploaded; 410 once the retention policy deleted it."""
    model = service.get_model(session, model_id, tenant_id=caller.tenant_id)
    if model.expired_at is not None:
        raise Gone(
            f"model {model_id}'s file was deleted by the retention policy on {model.expired_at:%Y-%m-%d}",
            code="model_expired",
        )
    return file_response(
        storage,
        model.storage_key,
        request,
        size=model.size_bytes,
        filename=model.name,
        headers={"etag": f'"{model.sha256}"'},
    )


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    summary="Delete a model",
    responses=error_responses(404, 409),
)
def delete_model(model_id: str, session: SessionDep, storage: StorageDep, caller: CallerDep) -> Response:
    """Deletes the model, its finished jobs and their artifacts. 409 while one of its jobs is queued or running."""
    service.delete_model(session, storage, model_id, tenant_id=caller.tenant_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
