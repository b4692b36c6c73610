"""JSON-line logs in Cloud Run's structured-logging format.

Cloud Run's logging agent parses each stdout line that is a JSON object: ``severity`` becomes the
entry's severity, ``message`` its text, ``httpRequest`` a request entry, and
``logging.googleapis.com/trace`` links the line to the request's trace. Trace context is taken
from ``traceparent`` (W3C) or ``X-Cloud-Trace-Context`` and kept in a context variable, so every
line logged while serving a request carries it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str | None
    sampled: bool


# Anchored, bounded, ASCII-only: `\d` would also match other scripts' digits, and an unbounded
# run of them reached int(), which refuses more than 4,300 digits (a 500 on every path).
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_CLOUD_TRACE = re.compile(r"^([0-9a-fA-F]{32})(?:/([0-9]{1,20}))?(?:;o=([01]))?$")
_MAX_HEADER = 512  # longer than any valid trace header; a longer one is not parsed at all

_current_trace: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar(
    "aifn_trace", default=None
)
_project: str | None = None


def parse_trace(traceparent: str | None, cloud_trace: str | None) -> TraceContext | None:
    """Trace context from the request headers; W3C ``traceparent`` wins when both are valid.

    Total: a header that is not valid (any text a client can send) is ignored, never an error;
    the request is served, only not linked to a trace.
    """
    if traceparent and len(traceparent) <= _MAX_HEADER:
        m = _TRACEPARENT.match(traceparent.strip().lower())
        # W3C Trace Context: version ff, an all-zero trace id or parent id are invalid.
        if m and m.group(1) != "ff" and m.group(2) != "0" * 32 and m.group(3) != "0" * 16:
            return TraceContext(m.group(2), m.group(3), int(m.group(4), 16) & 1 == 1)
    if cloud_trace and len(cloud_trace) <= _MAX_HEADER:
        m = _CLOUD_TRACE.match(cloud_trace.strip())
        if m and m.group(1) != "0" * 32:
            span: str | None = None
            if m.group(2):
                value = int(m.group(2))
                if value >= 2**64:  # the span id is an unsigned 64-bit decimal
                    return None
                span = f"{value:016x}"
            return TraceContext(m.group(1).lower(), span, m.group(3) == "1")
    return None


def set_trace(ctx: TraceContext | None) -> contextvars.Token[TraceContext | None]:
    return _current_trace.set(ctx)


def reset_trace(token: contextvars.Token[TraceContext | None]) -> None:
    _current_trace.reset(token)


class CloudRunFormatter(logging.Formatter):
    """Formats a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _severity(record.levelno),
            "message": record.getMessage(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "logger": record.name,
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            entry.update(extra)
        if record.exc_info:
            entry["stack_trace"] = "".join(traceback.format_exception(*record.exc_info))
            # Error Reporting picks up ERROR entries whose message holds a stack trace.
            entry["message"] = f"{entry['message']}\n{entry['stack_trace']}"
        trace = _current_trace.get()
        if trace is not None:
            entry["logging.googleapis.com/trace"] = (
                f"projects/{_project}/traces/{trace.trace_id}" if _project else trace.trace_id
            )
            if trace.span_id:
                entry["logging.googleapis.com/spanId"] = trace.span_id
            entry["logging.googleapis.com/trace_sampled"] = trace.sampled
        return json.dumps(entry, ensure_ascii=False, default=str)


def _severity(levelno: int) -> str:
    if levelno >= logging.CRITICAL:
        return "CRITICAL"
    if levelno >= logging.ERROR:
        return "ERROR"
    if levelno >= logging.WARNING:
        return "WARNING"
    if levelno >= logging.INFO:
        return "INFO"
    return "DEBUG"


def configure(level: str, project: str | None) -> None:
    """Send this process's logs to stdout as JSON lines (idempotent)."""
    global _project
    _project = project
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_aifn", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(CloudRunFormatter())
    handler._aifn = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter at INFO (e.g. HTTP clients) is not the service's story.
    for noisy in ("urllib3", "google", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
