"""Keyset pagination on ids, which sort by creation time (app.core.ids). Newest first; the cursor is the last
id of the page, so the schema can say exactly what a cursor looks like."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from app.core.errors import InvalidRequest

T = TypeVar("T")
CURSOR_PATTERN = r"^[a-z]{2,4}_[0-9a-z]{26}$"
_ID = re.compile(CURSOR_PATTERN)


def encode_cursor(last_id: str) -> str:
    return last_id


def decode_cursor(cursor: str) -> str:
    if not _ID.fullmatch(cursor):
        raise InvalidRequest(
            "the cursor is not one this API gave out: pass next_cursor from the previous page",
            code="invalid_cursor",
        )
    return cursor


def paginate(
    session: Session, query: Select[Any], id_column: Any, limit: int, cursor: str | None
) -> tuple[list[Any], str | None]:
    if cursor:
        query = query.where(id_column < decode_cursor(cursor))
    rows = list(session.scalars(query.order_by(id_column.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1].id) if len(rows) > limit else None
    return rows[:limit], next_cursor
