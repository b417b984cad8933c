"""Helpers shared by the resource routes: list parameters, streamed uploads and their OpenAPI description."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel
from sqlalchemy.orm import Session

from app.api.deps import require_broker
from app.core.config import Settings
from app.core.db import get_sessionmaker
from app.core.errors import BadRequest, RangeNotSatisfiable
from app.core.storage import LocalStorage
from app.models import Dataset, Model
from app.services.uploads import ReceivedUpload, receive_upload

T = TypeVar("T", Model, Dataset)
OutT = TypeVar("OutT", bound=BaseModel)

LimitQuery = Annotated[int, Query(ge=1, le=100, description="Page size.")]
CursorQuery = Annotated[str | None, Query(max_length=200, description="next_cursor of the previous page.")]


def multipart_body(fields: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """OpenAPI request body for a streamed upload, so that Swagger UI shows a file picker."""
    properties: dict[str, Any] = {
        "file": {
            "type": "string",
            "format": "binary",
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
                    "schema": {"type": "object", "required": ["file"], "properties": properties},
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


def _record(
    storage: LocalStorage,
    upload: ReceivedUpload,
    create: Callable[[Session, LocalStorage, ReceivedUpload], T],
    out: type[OutT],
) -> OutT:
    with get_sessionmaker()() as session:
        row = create(session, storage, upload)
        response = stored_out(row, out)
        try:
            session.commit()
        except Exception:
            storage.delete(row.storage_key)
            raise
        return response


async def handle_upload(
    request: Request,
    settings: Settings,
    storage: LocalStorage,
    *,
    fields: set[str],
    create: Callable[[Session, LocalStorage, ReceivedUpload], T],
    out: type[OutT],
) -> OutT:
    """Check the broker, stream the body to disk, then record it in a worker thread (sync database code)."""
    await run_in_threadpool(require_broker, settings)
    upload = await receive_upload(
        request.stream(),
        content_type=request.headers.get("content-type"),
        content_length=request.headers.get("content-length"),
        max_bytes=settings.max_upload_bytes,
        allowed_fields=fields,
        storage=storage,
    )
    try:
        return await run_in_threadpool(_record, storage, upload, create, out)
    finally:
        assert upload.file is not None
        upload.file.tmp_path.unlink(missing_ok=True)


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
