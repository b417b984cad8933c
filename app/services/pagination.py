"""Keyset pagination on ids, which sort by creation time (app.core.ids). Newest first."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest

T = TypeVar("T")
_ID = re.compile(r"[a-z]{2,4}_[0-9a-z]{26}")


def encode_cursor(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        value = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True).decode()
        if not _ID.fullmatch(value):
            raise ValueError(value)
        return value
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest(
            "the cursor is not one this API gave out: pass next_cursor from the previous page",
            code="invalid_cursor",
        ) from None


def paginate(
    session: Session, query: Select[Any], id_column: Any, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    if cursor:
        query = query.where(id_column < decode_cursor(cursor))
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
