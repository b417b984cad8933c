"""The gate in front of every /v1 route, before any of the request body is read: who is calling (API key),
whether their address sent too many wrong keys lately, whether they are over their request rate, and how large
a non-upload body may be.

A pure ASGI middleware rather than a FastAPI dependency: FastAPI reads and parses a JSON body before it runs
dependencies, and an upload route must refuse an unauthenticated 1 GB body without reading a byte of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPBearer
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.config import Settings, get_settings
from app.core.db import session_scope
from app.core.ratelimit import get_limiter, seconds_left
from app.services.auth import ANONYMOUS, Caller, check_key

log = logging.getLogger("qaas.api")

# The streamed multipart uploads: their size is checked against QAAS_MAX_UPLOAD_BYTES while streaming.
UPLOAD_PATHS = ("/v1/models", "/v1/datasets")
MISSING_KEY = (
    "this service needs an API key: send it as 'Authorization: Bearer KEY' (or 'X-API-Key: KEY'); an "
    "operator creates one with `qaas keys create --tenant NAME`"
)


def _json(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


def presented_key(scope: Scope) -> str | None:
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key", "").strip() or None


def client_address(scope: Scope) -> str:
    """The address failed key attempts are counted against: the TCP peer's.

    Behind a reverse proxy that is the proxy's address, shared by every client behind it, so one client's
    wrong keys would lock all of them out. qaas itself trusts no X-Forwarded-For (any client can send one);
    uvicorn replaces the peer with that header's client only when the peer is listed in its
    FORWARDED_ALLOW_IPS environment variable (default: 127.0.0.1 and ::1, so a proxy on the same machine is
    already understood). Set it to the proxy's address when the proxy runs elsewhere.
    """
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@dataclass(frozen=True)
class Refusal:
    """Why a presented key gets no answer: the error response to send instead."""

    status: int
    code: str
    detail: str
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        return _json(self.status, self.code, self.detail, self.headers)


INVALID_KEY = Refusal(
    401,
    "invalid_api_key",
    "the API key is unknown or revoked: check it, or ask an operator for a new one (`qaas keys create`)",
    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
)
FAILED_ATTEMPTS_WINDOW_S = 60


def check_caller(settings: Settings, key: str, address: str) -> Caller | Refusal:
    """The caller a presented key stands for, or why it is refused: too many wrong keys from `address` lately
    (decided before the key is looked at, so a throttled address learns nothing more about keys), a wrong key
    (counted against `address`), or a key over its request rate. The one check of a key, for the gate and for
    GET /readyz. Blocking (database and Redis): call it from a worker thread. Raises SQLAlchemyError when the
    database cannot check the key."""
    limiter = get_limiter()
    failures_allowed = settings.auth_failures_per_minute
    failures = f"auth_failures:{address}"
    if failures_allowed and limiter.count(failures, FAILED_ATTEMPTS_WINDOW_S) >= failures_allowed:
        return Refusal(
            429,
            "too_many_failed_attempts",
            f"{failures_allowed} wrong API keys came from {address} this minute "
            "(QAAS_AUTH_FAILURES_PER_MINUTE), so its keys are not checked until the minute ends: check the "
            "key, then retry after the Retry-After seconds",
            {"Retry-After": str(seconds_left(FAILED_ATTEMPTS_WINDOW_S))},
        )
    with session_scope() as session:
        caller = check_key(session, key)
    if caller is None:
        # Over `allowed - 1`: this failure used the allowance up (logged once per address and window).
        if failures_allowed and not limiter.hit(failures, failures_allowed - 1, FAILED_ATTEMPTS_WINDOW_S):
            log.warning(
                "%d wrong API keys from %s within a minute: refusing its keys", failures_allowed, address
            )
        return INVALID_KEY
    if settings.rate_limit_rps == 0:
        return caller
    assert caller.key_id is not None
    if not limiter.hit(caller.key_id, settings.rate_limit_rps):
        return Refusal(
            429,
            "rate_limited",
            f"more than {settings.rate_limit_rps} requests in one second with this key "
            "(QAAS_RATE_LIMIT_RPS): slow down and retry after the Retry-After seconds",
            {"Retry-After": "1"},
        )
    return caller


def key_holder(scope: Scope, settings: Settings) -> Caller | None:
    """For a route outside /v1 that shows more to callers with a valid key (GET /readyz): the caller, or None
    when the request has no key, a refused one (counted as the gate counts it), or one the database cannot
    check. Blocking: call it from a sync route."""
    key = presented_key(scope)
    if key is None:
        return None
    try:
        found = check_caller(settings, key, client_address(scope))
    except SQLAlchemyError as exc:
        log.warning("API key not checked: %s", exc)
        return None
    return found if isinstance(found, Caller) else None


class GuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        caller = ANONYMOUS
        if settings.auth == "required":
            key = presented_key(scope)
            if key is None:
                await _json(401, "unauthenticated", MISSING_KEY, {"WWW-Authenticate": "Bearer"})(
                    scope, receive, send
                )
                return
            try:
                found = await run_in_threadpool(check_caller, settings, key, client_address(scope))
            except SQLAlchemyError as exc:  # unreachable, or every pooled connection busy
                log.warning("API key not checked: %s", exc)
                await _json(
                    503,
                    "dependency_unavailable",
                    "the database is unreachable, so the API key cannot be checked: retry shortly",
                    {"Retry-After": "5"},
                )(scope, receive, send)
                return
            if isinstance(found, Refusal):
                await found.response()(scope, receive, send)
                return
            caller = found
        scope.setdefault("state", {})["caller"] = caller
        is_upload = scope["method"] == "POST" and scope["path"].rstrip("/") in UPLOAD_PATHS
        if not is_upload:
            limit = settings.max_json_bytes
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > limit:
                await _json(413, "body_too_large", _too_large(limit))(scope, receive, send)
                return
            receive = _capped(receive, limit)
        await self.app(scope, receive, send)


def _too_large(limit: int) -> str:
    return f"the request body is over {limit} bytes (QAAS_MAX_JSON_BYTES): send a smaller request"


def _capped(receive: Receive, limit: int) -> Receive:
    """A receive that stops a streamed (chunked) body once it passes `limit` bytes, with a 413."""
    received = 0

    async def wrapped() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                # FastAPI turns other exceptions raised while it reads a body into a 400.
                raise StarletteHTTPException(413, _too_large(limit))
        return message

    return wrapped


# Documents the two ways to send a key in the OpenAPI schema (Swagger UI's Authorize button); the check
# itself happened in GuardMiddleware.
_bearer = HTTPBearer(auto_error=False, description="An API key from `qaas keys create`.")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same key, in its own header.")


def current_caller(
    request: Request,
    _bearer_key: Annotated[Any, Security(_bearer)] = None,
    _header_key: Annotated[Any, Security(_api_key)] = None,
) -> Caller:
    caller = getattr(request.state, "caller", None)
    if not isinstance(caller, Caller):
        # Fail closed: a route reached without the gate must not act as anybody.
        raise RuntimeError("GuardMiddleware did not run for this request")
    return caller


CallerDep = Annotated[Caller, Depends(current_caller)]
