"""Helpers shared by the resource routes: the multipart body description and list parameters."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Query

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
