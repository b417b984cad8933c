"""Typed dependencies that keep routes short."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker
from app.core.storage import LocalStorage, get_storage


def get_db() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]


def require_broker(settings: Settings) -> None:
    """Refuse work the workers could never receive: 503 before anything is read or recorded."""
    from app.core import queue
    from app.core.errors import ServiceUnavailable

    try:
        queue.check_broker(settings.readiness_timeout_s)
    except Exception as exc:
        raise ServiceUnavailable(
            f"the job broker is unreachable ({type(exc).__name__}): nothing was recorded; retry when GET /readyz "
            "answers 200",
            code="dependency_unavailable",
            headers={"Retry-After": "5"},
        ) from exc
