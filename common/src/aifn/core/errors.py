"""What can go wrong, without a transport: the errors the core and the file path raise.

Each :class:`Error` has a stable machine-readable ``type`` and a ``message`` for people. Nothing
here knows about HTTP: the edge maps each type to a status code once (:mod:`aifn.http.errors`),
and the file path writes ``type`` and ``message`` into a file's errors (:mod:`aifn.files`).
"""

from __future__ import annotations

from typing import ClassVar


class ConfigError(Exception):
    """A setting or a model directory is unusable; raised at startup, never per request."""


class Error(Exception):
    """Base of every error a caller can see (a response, or a record of a file's errors).

    Args:
        message: For people; may change between versions.
        retry_after: Seconds after which trying again may succeed; ``None``: retrying as is
            will not help.
    """

    type: ClassVar[str] = "internal"
    description: ClassVar[str] = ""

    def __init__(self, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidJson(Error):
    type = "invalid_json"
    description = "The body is not valid JSON, or not valid UTF-8."


class InvalidRequest(Error):
    type = "invalid_request"
    description = (
        "Valid JSON of the wrong shape: a missing, unknown or mistyped field, or an empty text "
        "or list."
    )


class TooManyTexts(Error):
    type = "too_many_texts"
    description = "More texts in one request than `MAX_BATCH_TEXTS`."


class TooManyTokens(Error):
    type = "too_many_tokens"
    description = (
        "The request's texts (each up to `MAX_TOKENS`) and new zero-shot label prompts come to "
        "more tokens than `MAX_REQUEST_TOKENS`; nothing was done. Send fewer or shorter texts."
    )


class Overloaded(Error):
    type = "overloaded"
    description = (
        "The instance's queue is full; nothing was done. Retry after the `Retry-After` seconds "
        "(Cloud Run routes retries to other instances as it scales out)."
    )


class DeadlineExceeded(Error):
    type = "deadline_exceeded"
    description = (
        "The request waited longer than `REQUEST_TIMEOUT_SECONDS` for the model; retry after "
        "`Retry-After` seconds."
    )


class NotReady(Error):
    type = "not_ready"
    description = "The model is not loaded yet or failed its warm-up; retry later."


class InternalError(Error):
    type = "internal"
    description = "A bug or an unexpected failure; the log has the stack trace and the trace id."
