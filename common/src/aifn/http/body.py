"""Reading a request's JSON body: media type, size and encoding checked, or a precise 4xx."""

from __future__ import annotations

from typing import Any

from flask import Request

from aifn.core.errors import InvalidJson
from aifn.core.validation import decode_json
from aifn.http.errors import PayloadTooLarge, UnsupportedMediaType


def read_json(request: Request, *, max_bytes: int) -> Any:
    """Read and decode a JSON body, enforcing type, size and encoding.

    The size is checked against ``Content-Length`` before reading, and the stream is read at most
    ``max_bytes + 1`` bytes, so a chunked upload cannot exhaust memory either.
    """
    mimetype = request.mimetype
    if mimetype != "application/json" and not (
        mimetype.startswith("application/") and mimetype.endswith("+json")
    ):
        shown = request.content_type or "none"
        raise UnsupportedMediaType(f"expected Content-Type: application/json, got {shown}")
    charset = request.mimetype_params.get("charset", "utf-8").lower()
    if charset not in {"utf-8", "utf8"}:
        raise UnsupportedMediaType(f"the body must be UTF-8, not {charset}")
    if request.content_length is not None and request.content_length > max_bytes:
        _skip_rest_of_body(request)
        raise PayloadTooLarge(
            f"body is {request.content_length} bytes; the limit is {max_bytes} (MAX_BODY_BYTES)"
        )
    try:
        raw = request.stream.read(max_bytes + 1)
    except Exception as exc:  # the client's connection, whatever its server raises
        # The body did not arrive whole: the client went away mid-body, or its chunked framing
        # is broken (gunicorn raises NoMoreData, InvalidChunkSize, ...; werkzeug
        # ClientDisconnected). The client's doing, so a 400, not a 500 with a stack trace.
        _skip_rest_of_body(request)
        raise InvalidJson(
            f"the body could not be read whole ({type(exc).__name__}): the connection ended "
            "or its chunked encoding is broken"
        ) from None
    if len(raw) > max_bytes:
        _skip_rest_of_body(request)
        raise PayloadTooLarge(f"body is over the limit of {max_bytes} bytes (MAX_BODY_BYTES)")
    request._cached_data = raw  # see _skip_rest_of_body
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidJson(f"body is not valid UTF-8 (byte {exc.start})") from None
    if not text.strip():
        raise InvalidJson("body is empty; send a JSON object")
    return decode_json(text)


def _skip_rest_of_body(request: Request) -> None:
    """Keep an over-size body out of memory.

    functions-framework reads the whole body after every response (``request.get_data()`` in an
    ``after_request`` hook); werkzeug returns ``_cached_data`` instead when it is set. The server
    (gunicorn) then discards the unread bytes in small reads before the next request.
    """
    request._cached_data = b""
