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

log = logging.getLogger("qaas.api")

# The one table from domain errors to HTTP statuses.
STATUS = {
    errors.InvalidRequest: 422,
    errors.BadRequest: 400,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.PayloadTooLarge: 413,
    errors.UnsupportedMediaType: 415,
    errors.RangeNotSatisfiable: 416,
    errors.Unauthorized: 401,
    errors.Gone: 410,
    errors.TooManyRequests: 429,
    errors.ServiceUnavailable: 503,
}
_HTTP_CODES = {
    404: "not_found",
    405: "method_not_allowed",
    400: "bad_request",
    413: "body_too_large",
    416: "range_not_satisfiable",
}


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
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

    @app.exception_handler(errors.QaasError)
    async def _qaas_error(_request: Request, exc: errors.QaasError) -> JSONResponse:
        status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 400)
        return _error(status, exc.code, exc.detail, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "validation_error", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first matching route's methods; FastAPI has one route per method.
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return _error(exc.status_code, code, str(exc.detail), headers)

    @app.exception_handler(PoolTimeoutError)
    async def _pool_exhausted(_request: Request, exc: PoolTimeoutError) -> JSONResponse:
        log.warning("no database connection free: %s", exc)
        return _error(
            503, "dependency_unavailable", "the database is overloaded: retry shortly", {"Retry-After": "5"}
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database_error(_request: Request, exc: DBAPIError) -> JSONResponse:
        if not exc.connection_invalidated and not isinstance(exc, OperationalError):
            log.exception("database error")
            return _error(500, "internal_error", "an unexpected database error happened; it was logged")
        log.warning("database unavailable: %s", exc.orig)
        return _error(
            503, "dependency_unavailable", "the database is unreachable: retry shortly", {"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal_error", "an unexpected error happened; it was logged")

    for router in (models.router, datasets.router, jobs.router, reports.router, health.router):
        app.include_router(router)
    app.include_router(metrics.router)  # GET /metrics: no key, not in the schema
    # Outermost: nothing under /v1 runs, and no body is read, before the caller is known.
    app.add_middleware(GuardMiddleware)
    # Outside the guard: a body that stalls gets 408 whoever reads it (QAAS_READ_TIMEOUT_S).
    app.add_middleware(ReadTimeoutMiddleware)
    return app
