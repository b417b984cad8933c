"""Typed dependencies that keep routes short."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends
from fastapi.routing import APIRoute
from sqlalchemy.orm import Session

from app.core.config import Settings, get_settings
from app.core.db import get_sessionmaker
from app.core.storage import Storage, get_storage


def get_db() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_db)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StorageDep = Annotated[Storage, Depends(get_storage)]


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


def _releasing(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    return wrapper


class ReleasingRoute(APIRoute):
    """A sync endpoint gives its database connection back as soon as it returns.

    FastAPI validates a sync endpoint's response in a worker thread, and closes the session only after that.
    Under load every worker thread can be waiting for a pooled connection while every connection belongs to a
    request waiting for a thread to validate its response: a deadlock that only the pool's 30 s timeout broke
    (seen in bench/load.py). Endpoints build their response objects before they return, so closing there is safe.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _releasing(endpoint)
        super().__init__(path, endpoint, **kwargs)
