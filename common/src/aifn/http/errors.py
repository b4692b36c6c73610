"""The errors only HTTP has, and the one table of error type to status code.

Every error a client sees is an :class:`aifn.core.errors.Error` (the core's own, or one of
these); its body is always::

    {"error": {"type": "invalid_request", "message": "texts[2] must be a string", "status": 422}}

``type`` is stable and machine-readable; ``message`` is for people and may change.
"""

from __future__ import annotations

from typing import Any

from aifn.core.errors import (
    DeadlineExceeded,
    Error,
    InternalError,
    InvalidJson,
    InvalidRequest,
    NotReady,
    Overloaded,
    TooManyTexts,
    TooManyTokens,
)

__all__ = [
    "ERROR_TYPES",
    "STATUS",
    "DeadlineExceeded",
    "Error",
    "HttpError",
    "InternalError",
    "InvalidJson",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "NotReady",
    "Overloaded",
    "PayloadTooLarge",
    "RateLimited",
    "TooManyTexts",
    "TooManyTokens",
    "Unauthorized",
    "UnsupportedMediaType",
    "body",
    "errors_table",
    "headers",
    "status",
]


class HttpError(Error):
    """An error of the HTTP edge itself, with the response headers it needs (``Allow``, ...)."""

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers = headers or {}


class NotFound(HttpError):
    type = "not_found"
    description = "No endpoint at this path."


class MethodNotAllowed(HttpError):
    type = "method_not_allowed"
    description = "The path exists but not with this method; the `Allow` header lists the methods."


class PayloadTooLarge(HttpError):
    type = "payload_too_large"
    description = "The body is larger than `MAX_BODY_BYTES`."


class Unauthorized(HttpError):
    type = "unauthorized"
    description = (
        "API-key mode is on (`API_KEYS`) and the request has no `X-API-Key` header, or not a "
        "current key."
    )


class UnsupportedMediaType(HttpError):
    type = "unsupported_media_type"
    description = "The body is not sent as `Content-Type: application/json` (UTF-8)."


class RateLimited(HttpError):
    type = "rate_limited"
    description = (
        "This client used up its request budget (`RATE_LIMIT`); nothing was done. Retry after "
        "`Retry-After` seconds; the `RateLimit-*` headers show the budget."
    )


# Every error type a client can see, in the order of the docs' table, with its status.
STATUS: dict[type[Error], int] = {
    InvalidJson: 400,
    Unauthorized: 401,
    NotFound: 404,
    MethodNotAllowed: 405,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidRequest: 422,
    TooManyTexts: 422,
    TooManyTokens: 422,
    Overloaded: 429,
    RateLimited: 429,
    DeadlineExceeded: 503,
    NotReady: 503,
    InternalError: 500,
}
ERROR_TYPES: tuple[type[Error], ...] = tuple(STATUS)


def status(error: Error | type[Error]) -> int:
    """The HTTP status of an error (500 for one this table does not know)."""
    cls = error if isinstance(error, type) else type(error)
    for known in cls.__mro__:
        if known in STATUS:
            return STATUS[known]
    return 500


def body(exc: Error) -> dict[str, Any]:
    return {"error": {"type": exc.type, "message": exc.message, "status": status(exc)}}


def headers(exc: Error) -> dict[str, str]:
    """The response headers an error carries: its own, and ``Retry-After`` when it has one."""
    out = dict(exc.headers) if isinstance(exc, HttpError) else {}
    if exc.retry_after is not None:
        out.setdefault("Retry-After", str(exc.retry_after))
    return out


def errors_table() -> str:
    """The error table of docs/api.md, as Markdown."""
    lines = ["| `type` | Status | When |", "|---|---|---|"]
    lines += [f"| `{e.type}` | {STATUS[e]} | {e.description} |" for e in ERROR_TYPES]
    return "\n".join(lines)
