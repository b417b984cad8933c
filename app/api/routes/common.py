"""Helpers shared by the resource routes: list parameters, streamed uploads and their OpenAPI description,
stored-file downloads."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from fastapi import Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.api.deps import require_broker
from app.core import metrics
from app.core.config import Settings
from app.core.db import get_sessionmaker
from app.core.errors import BadRequest, Gone, InvalidRequest, RangeNotSatisfiable
from app.core.storage import LocalStorage, S3Storage, Storage, StoredFileMissing
from app.models import Dataset, Model
from app.services import quotas, stored
from app.services.auth import Caller
from app.services.pagination import CURSOR_PATTERN
from app.services.uploads import MULTIPART_OVERHEAD_BYTES, ReceivedUpload, receive_upload
from qaas.contract import archives

T = TypeVar("T", Model, Dataset)
OutT = TypeVar("OutT", bound=BaseModel)

LimitQuery = Annotated[int, Query(ge=1, le=100, description="Page size.")]
CursorQuery = Annotated[
    str | None, Query(pattern=CURSOR_PATTERN, description="next_cursor of the previous page.")
]


def multipart_body(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI request body for a streamed upload, so that Swagger UI shows a file picker."""
    properties: dict[str, Any] = {
        "file": {
            "type": "string",
            "format": "binary",
            "minLength": 1,
            "contentMediaType": "application/octet-stream",
            "description": "The file to upload.",
        }
    }
    # An empty example keeps Swagger UI from pre-filling optional fields with the word "string".
    properties.update({name: {"example": ""} | spec for name, spec in fields.items()})
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": properties,
                        "additionalProperties": False,
                    },
                    "encoding": {"file": {"contentType": "application/octet-stream"}},
                }
            },
        }
    }


def stored_out(row: Model | Dataset, out: type[OutT]) -> OutT:
    """The response model of a stored upload, with `error` built from its code and message."""
    fields = {key: getattr(row, key) for key in out.model_fields if hasattr(row, key)}
    error = {"code": row.error_code, "message": row.error_message} if row.error_code else None
    return out.model_validate(fields | {"error": error})


def _check_room(settings: Settings, caller: Caller, declared: int) -> None:
    """Before a byte is read: the broker is up and the tenant has room for what the request says it sends, and
    for one more upload to inspect. (No lock here: `stored.save_upload` checks again, locked, before it commits.)"""
    require_broker(settings)
    with get_sessionmaker()() as session:
        quotas.check_inspecting(session, settings, caller.tenant_id)
        quotas.check_storage(session, settings, caller.tenant_id, max(0, declared - MULTIPART_OVERHEAD_BYTES))


def _check_content(upload: ReceivedUpload) -> None:
    """Zip archives (entry count, expanded size, ratio, paths, links) and safetensors headers, checked before
    anything keeps the file: the runner checks again before it reads one."""
    assert upload.file is not None
    try:
        archives.check_upload(upload.file.tmp_path, upload.file.filename)
    except archives.ArchiveRefused as exc:
        raise InvalidRequest(exc.message, code=exc.code) from None


def _record(
    storage: Storage,
    settings: Settings,
    caller: Caller,
    upload: ReceivedUpload,
    create: Callable[[Session, Storage, ReceivedUpload, str], T],
    out: type[OutT],
) -> OutT:
    """Check the received file's content, then save it (app.services.stored.save_upload commits)."""
    _check_content(upload)
    assert upload.file is not None
    with get_sessionmaker()() as session:
        row = stored.save_upload(session, settings, storage, upload, create, tenant_id=caller.tenant_id)
        response = stored_out(row, out)
    metrics.count_upload("model" if isinstance(row, Model) else "dataset", upload.file.size_bytes)
    return response


async def handle_upload(
    request: Request,
    settings: Settings,
    storage: Storage,
    caller: Caller,
    *,
    fields: set[str],
    create: Callable[[Session, Storage, ReceivedUpload, str], T],
    out: type[OutT],
) -> OutT:
    """Check the broker and the tenant's storage quota, stream the body to disk, check its content, then
    record it in a worker thread (sync database code). The caller was authenticated before (app.api.guard)."""
    declared = request.headers.get("content-length", "")
    await run_in_threadpool(_check_room, settings, caller, int(declared) if declared.isdigit() else 0)
    upload = await receive_upload(
        request.stream(),
        content_type=request.headers.get("content-type"),
        content_length=request.headers.get("content-length"),
        max_bytes=settings.max_upload_bytes,
        allowed_fields=fields,
        storage=storage,
    )
    try:
        return await run_in_threadpool(_record, storage, settings, caller, upload, create, out)
    finally:
        assert upload.file is not None
        upload.file.tmp_path.unlink(missing_ok=True)


def _file_missing() -> Gone:
    return Gone(
        "the stored file is missing from the data directory (removed outside qaas): upload it or run the "
        "job again, and tell the operator",
        code="file_missing",
    )


def existing_file(storage: LocalStorage, key: str) -> Path:
    """The stored file behind a row, or 410 when it is gone (removed outside qaas: retention marks its rows)."""
    path = storage.path(key)
    if not path.is_file():
        raise _file_missing()
    return path


def file_response(
    storage: Storage, key: str, request: Request, *, size: int, filename: str, headers: dict[str, str]
) -> Response:
    """A stored file as a download, Range requests included; 410 when it is gone. Local files go out as a
    FileResponse; an S3 object is streamed, the request's Range passed through to S3 (206 + Content-Range)."""
    header = request.headers.get("range")
    check_range(header, size)
    if isinstance(storage, LocalStorage):
        return FileResponse(
            existing_file(storage, key),
            media_type="application/octet-stream",
            filename=filename,
            headers=headers,
        )
    assert isinstance(storage, S3Storage)
    # S3 serves one range per request: a multi-range request gets the whole file (RFC 9110 lets a server
    # ignore Range), a single one goes through without the whitespace RFC 9110 allows and S3 may not.
    spec = header.partition("=")[2].replace(" ", "").replace("\t", "") if header else ""
    byte_range = f"bytes={spec}" if spec and "," not in spec else None
    try:
        stored = storage.open(key, byte_range)
    except StoredFileMissing:
        raise _file_missing() from None
    headers = headers | {
        "content-length": str(stored.length),
        "accept-ranges": "bytes",
        "content-disposition": _attachment(filename),
    }
    if stored.content_range is not None:
        headers["content-range"] = stored.content_range
    return StreamingResponse(
        stored.chunks(),
        status_code=206 if stored.content_range is not None else 200,
        media_type="application/octet-stream",
        headers=headers,
    )


def _attachment(filename: str) -> str:
    """Content-Disposition exactly as Starlette's FileResponse writes it."""
    quoted = quote(filename)
    if quoted != filename:
        return f"attachment; filename*=utf-8''{quoted}"
    return f'attachment; filename="{filename}"'


_RANGE = re.compile(r"\s*(\d*)\s*-\s*(\d*)\s*")


def check_range(header: str | None, size: int) -> None:
    """Refuse a bad `Range` header with the one error schema before the file response sees it (RFC 9110 14.2)."""
    if header is None:
        return
    unit, _, spec = header.partition("=")
    parts = [_RANGE.fullmatch(part) for part in spec.split(",")]
    if unit.strip().lower() != "bytes" or not spec or any(m is None or m.groups() == ("", "") for m in parts):
        raise BadRequest(
            f"malformed Range header {header!r}: use e.g. 'bytes=0-1023'", code="malformed_range"
        )
    for match in parts:
        assert match is not None
        start, end = match.groups()
        if (start == "" and int(end) > 0) or (
            start != "" and int(start) < size and (end == "" or int(end) >= int(start))
        ):
            return
    raise RangeNotSatisfiable(
        f"no part of Range {header!r} lies within the file's {size} bytes",
        headers={"Content-Range": f"bytes */{size}"},
    )
