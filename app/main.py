"""create_app(): routers, the one error format, offline Swagger UI."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.guard import GuardMiddleware
from app.api.routes import datasets, health, jobs, metrics, models, reports
from app.api.timeouts import ReadTimeoutMiddleware
from app.core import errors
from qaas.contract.errors import ErrorCode, http_status

log = logging.getLogger("qaas.api")


# The one table from domain errors to HTTP statuses, each class's the status of its code in the catalogue
# (docs/errors.md). Subclasses come before their bases: the first class an error is an instance of decides.
def _most_specific_first(cls: type[errors.QaasError]) -> list[type[errors.QaasError]]:
    return [*(found for sub in cls.__subclasses__() for found in _most_specific_first(sub)), cls]


STATUS = {cls: http_status(cls.code) for cls in _most_specific_first(errors.QaasError)}
# Starlette's own HTTP errors (no route, wrong method, an unreadable or too large body, a bad Range).
_HTTP_CODES = {
    http_status(code): code
    for code in (
        ErrorCode.NOT_FOUND,
        ErrorCode.METHOD_NOT_ALLOWED,
        ErrorCode.BAD_REQUEST,
        ErrorCode.BODY_TOO_LARGE,
        ErrorCode.RANGE_NOT_SATISFIABLE,
    )
}


def _error(
    code: str, detail: str, headers: dict[str, str] | None = None, *, status: int | None = None
) -> JSONResponse:
    """The one error body, sent with the code's status in the catalogue unless `status` is given."""
    status = http_status(code) if status is None else status
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for item in exc.errors()[:10]:
        where = ".".join(str(p) for p in item.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {item.get('msg', 'invalid')}")
    return "; ".join(parts) + " (see the schema at /docs)"


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    # FastAPI 0.165 wraps included routers, which have no `methods`: ask each route about each method.
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]


def create_app() -> FastAPI:
    app = FastAPIOffline(
        title="qaas",
        version="0.1.0",
        summary="Quantization as a service: upload a PyTorch model, get back a verified int8 model.",
        swagger_ui_parameters={"tryItOutEnabled": True},
        redoc_url=None,
    )
    _answer_errors(app)
    for router in (models.router, datasets.router, jobs.router, reports.router, health.router):
        app.include_router(router)
    app.include_router(metrics.router)  # GET /metrics: no key, not in the schema
    # Outermost: nothing under /v1 runs, and no body is read, before the caller is known.
    app.add_middleware(GuardMiddleware)
    # Outside the guard: a body that stalls gets 408 whoever reads it (QAAS_READ_TIMEOUT_S).
    app.add_middleware(ReadTimeoutMiddleware)
    return app


def _answer_errors(app: FastAPI) -> None:
    """Every error becomes `{"error": code, "detail": ...}` with the catalogue's status (docs/errors.md)."""

    @app.exception_handler(errors.QaasError)
    async def _qaas_error(_request: Request, exc: errors.QaasError) -> JSONResponse:
        status = next(status for cls, status in STATUS.items() if isinstance(exc, cls))
        return _error(exc.code, exc.detail, exc.headers, status=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(ErrorCode.VALIDATION_ERROR, _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; FastAPI has one route per method.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error(code, str(exc.detail), headers, status=exc.status_code)

    @app.exception_handler(PoolTimeoutError)
    async def _pool_exhausted(_request: Request, exc: PoolTimeoutError) -> JSONResponse:
        log.warning("no database connection free: %s", exc)
        return _error(
            ErrorCode.DEPENDENCY_UNAVAILABLE,
            "the database is overloaded: retry shortly",
            {"Retry-After": "5"},
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if not exc.connection_invalidated and not isinstance(exc, OperationalError):
            log.exception("database error")
            return _error(ErrorCode.INTERNAL_ERROR, "an unexpected database error happened; it was logged")
        log.warning("database unavailable: %s", exc.orig)
        return _error(
            ErrorCode.DEPENDENCY_UNAVAILABLE,
            "the database is unreachable: retry shortly",
            {"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(ErrorCode.INTERNAL_ERROR, "an unexpected error happened; it was logged")
