"""One exception hierarchy with stable codes; the HTTP status is mapped in one table, in app.main, from each
class's code in the catalogue (qaas.contract.errors, docs/errors.md)."""

from __future__ import annotations

from qaas.contract.errors import ErrorCode


class QaasError(Exception):
    """A problem the caller can act on. `code` is stable snake_case, a code of the catalogue (a raised one
    overrides the class's own); `detail` says what to fix. Raised as such, it answers 400 bad_request."""

    code: str = ErrorCode.BAD_REQUEST

    def __init__(self, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(QaasError):
    code = ErrorCode.BAD_REQUEST


class NotFound(QaasError):
    code = ErrorCode.NOT_FOUND


class Conflict(QaasError):
    code = ErrorCode.CONFLICT


class InvalidRequest(QaasError):
    code = ErrorCode.INVALID_REQUEST


class PayloadTooLarge(QaasError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(QaasError):
    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class Unauthorized(QaasError):
    code = ErrorCode.UNAUTHENTICATED


class TooManyRequests(QaasError):
    code = ErrorCode.TOO_MANY_REQUESTS


class Gone(QaasError):
    code = ErrorCode.GONE


class RangeNotSatisfiable(QaasError):
    code = ErrorCode.RANGE_NOT_SATISFIABLE


class ServiceUnavailable(QaasError):
    code = ErrorCode.DEPENDENCY_UNAVAILABLE


def not_found(kind: str, object_id: str) -> NotFound:
    """404 `{kind}_not_found` (job, model, dataset). Raises ValueError for a kind with no such code."""
    return NotFound(
        f"no {kind} with id '{object_id}': check the id (list them with GET /v1/{kind}s)",
        code=ErrorCode(f"{kind}_not_found"),
    )
