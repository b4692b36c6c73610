"""One error hierarchy, one JSON body, one table of error type to HTTP status.

Every error a client can see is an :class:`ApiError`; its body is always::

    {"error": {"type": "invalid_request", "message": "texts[2] must be a string", "status": 422}}

``type`` is stable and machine-readable; ``message`` is for people and may change.
"""

from __future__ import annotations

from typing import Any, ClassVar


class ConfigError(Exception):
    """A setting or a model directory is unusable; raised at startup, never per request."""


class ApiError(Exception):
    """Base of every error returned to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal"
    description: ClassVar[str] = ""

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"type": self.type, "message": self.message, "status": self.status}}


class InvalidJson(ApiError):
    status = 400
    type = "invalid_json"
    description = "The body is not valid JSON, or not valid UTF-8."


class NotFound(ApiError):
    status = 404
    type = "not_found"
    description = "No endpoint at this path."


class MethodNotAllowed(ApiError):
    status = 405
    type = "method_not_allowed"
    description = "The path exists but not with this method; the `Allow` header lists the methods."


class PayloadTooLarge(ApiError):
    status = 413
    type = "payload_too_large"
    description = "The body is larger than `MAX_BODY_BYTES`."


class Unauthorized(ApiError):
    status = 401
    type = "unauthorized"
    description = (
        "API-key mode is on (`API_KEYS`) and the request has no `X-API-Key` header, or not a "
        "current key."
    )


class UnsupportedMediaType(ApiError):
    status = 415
    type = "unsupported_media_type"
    description = "The body is not sent as `Content-Type: application/json` (UTF-8)."


class InvalidRequest(ApiError):
    status = 422
    type = "invalid_request"
    description = (
        "Valid JSON of the wrong shape: a missing, unknown or mistyped field, or an empty text "
        "or list."
    )


class TooManyTexts(ApiError):
    status = 422
    type = "too_many_texts"
    description = "More texts in one request than `MAX_BATCH_TEXTS`."


class TooManyTokens(ApiError):
    status = 422
    type = "too_many_tokens"
    description = (
        "The request's texts (each up to `MAX_TOKENS`) and new zero-shot label prompts come to "
        "more tokens than `MAX_REQUEST_TOKENS`; nothing was done. Send fewer or shorter texts."
    )


class Overloaded(ApiError):
    status = 429
    type = "overloaded"
    description = (
        "The instance's queue is full; nothing was done. Retry after the `Retry-After` seconds "
        "(Cloud Run routes retries to other instances as it scales out)."
    )


class RateLimited(ApiError):
    status = 429
    type = "rate_limited"
    description = (
        "This client used up its request budget (`RATE_LIMIT`); nothing was done. Retry after "
        "`Retry-After` seconds; the `RateLimit-*` headers show the budget."
    )


class DeadlineExceeded(ApiError):
    status = 503
    type = "deadline_exceeded"
    description = (
        "The request waited longer than `REQUEST_TIMEOUT_SECONDS` for the model; retry after "
        "`Retry-After` seconds."
    )


class NotReady(ApiError):
    status = 503
    type = "not_ready"
    description = "The model is not loaded yet or failed its warm-up; retry later."


class InternalError(ApiError):
    status = 500
    type = "internal"
    description = "A bug or an unexpected failure; the log has the stack trace and the trace id."


ERROR_TYPES: tuple[type[ApiError], ...] = (
    InvalidJson,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    UnsupportedMediaType,
    InvalidRequest,
    TooManyTexts,
    TooManyTokens,
    Overloaded,
    RateLimited,
    DeadlineExceeded,
    NotReady,
    InternalError,
)


def errors_table() -> str:
    """The error table of docs/api.md, as Markdown."""
    lines = ["| `type` | Status | When |", "|---|---|---|"]
    lines += [f"| `{e.type}` | {e.status} | {e.description} |" for e in ERROR_TYPES]
    return "\n".join(lines)
