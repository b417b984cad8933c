"""One exception hierarchy with stable codes; the HTTP status is mapped in one table, in app.main."""

from __future__ import annotations


class QaasError(Exception):
    """A problem the caller can act on. `code` is stable snake_case; `detail` says what to fix."""

    code = "error"

    def __init__(self, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(QaasError):
    code = "bad_request"


class NotFound(QaasError):
    code = "not_found"


class Conflict(QaasError):
    code = "conflict"


class InvalidRequest(QaasError):
    code = "invalid_request"


class PayloadTooLarge(QaasError):
    code = "payload_too_large"


class UnsupportedMediaType(QaasError):
    code = "unsupported_media_type"


class Unauthorized(QaasError):
    code = "unauthenticated"


class TooManyRequests(QaasError):
    code = "too_many_requests"


class Gone(QaasError):
    code = "gone"


class RangeNotSatisfiable(QaasError):
    code = "range_not_satisfiable"


class ServiceUnavailable(QaasError):
    code = "dependency_unavailable"


def not_found(kind: str, object_id: str) -> NotFound:
    return NotFound(
        f"no {kind} with id '{object_id}': check the id (list them with GET /v1/{kind}s)",
        code=f"{kind}_not_found",
    )
