"""JSON-line logs in Cloud Run's structured-logging format.

Cloud Run's logging agent parses each stdout line that is a JSON object: ``severity`` becomes the
entry's severity, ``message`` its text, ``httpRequest`` a request entry, and
``logging.googleapis.com/trace`` links the line to the request's trace. Trace context is taken
from ``traceparent`` (W3C) or ``X-Cloud-Trace-Context`` and kept in a context variable, so every
line logged while serving a request carries it.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import queue
import re
import sys
import threading
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


class LineWriterHandler(logging.Handler):
    """Formats a record in the thread that logs it; one thread of its own writes the lines.

    Why not :class:`logging.StreamHandler`: it holds its lock across the write, and a thread
    back from the write system call must take the GIL again before it can let go of that lock.
    Under load (hundreds of request threads) every log line then waits behind that hand-off, up
    to the interpreter's switch interval (5 ms) each: the request log alone capped an instance
    at a few hundred lines a second and made overload refusals slow. Here a request thread only
    formats its line (the trace context is its own) and queues it; the writer writes whatever
    has queued in one call, in the order it was logged (the stdlib's ``QueueHandler`` pattern).

    Nothing queued is lost on a normal exit or a fork: :meth:`flush` returns once every line
    logged before it is written, and ``logging.shutdown`` (at exit) and a fork call it. If the
    writer falls behind (a stalled stdout), a thread logging past ``max_queued`` lines waits for
    it, as a ``StreamHandler`` would: memory stays bounded.
    """

    _BATCH = 256  # most lines one write joins

    def __init__(self, stream: Any, *, max_queued: int = 10_000) -> None:
        super().__init__()
        self.stream = stream
        self.max_queued = max_queued
        self._reset()
        os.register_at_fork(before=self.flush, after_in_child=self._reset)

    def _reset(self) -> None:
        # Threads do not survive a fork: the child starts its own writer on its first line.
        self._queue: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: nothing is shared before the queue, which is thread-safe.
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return bool(rv)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._queue.put(line)
        if self._writer is None:
            self._start()
        elif self._queue.qsize() > self.max_queued:
            self.flush()

    def _start(self) -> None:
        with self._start_lock:
            if self._writer is None:
                writer = threading.Thread(target=self._run, name="aifn-log-writer", daemon=True)
                writer.start()
                self._writer = writer

    def _run(self) -> None:
        while True:
            self._write_batch(self._queue.get())

    def _write_batch(self, first: str | threading.Event) -> None:
        lines: list[str] = []
        item: str | threading.Event | None = first
        while item is not None:
            if isinstance(item, threading.Event):  # a flush() waiting for what came before it
                self._write(lines)
                lines = []
                item.set()
            else:
                lines.append(item)
            if len(lines) >= self._BATCH:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                item = None
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        try:
            self.stream.write("".join(lines))
            self.stream.flush()
        except Exception as exc:  # a closed or broken stdout: say so where it may still be seen
            with contextlib.suppress(Exception):
                sys.stderr.write(f"aifn: {len(lines)} log lines lost, stdout failed: {exc!r}\n")

    def close(self) -> None:
        self.flush()
        super().close()

    def flush(self, timeout: float = 10.0) -> None:
        """Write every line logged before this call, then return."""
        writer = self._writer
        if writer is None or not writer.is_alive() or writer is threading.current_thread():
            while True:  # no writer in this process: write what is queued here
                try:
                    self._write_batch(self._queue.get_nowait())
                except queue.Empty:
                    return
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)


def configure(level: str, project: str | None) -> None:
    """Send this process's logs to stdout as JSON lines (idempotent)."""
    global _project
    _project = project
    root = logging.getLogger()
    ours = [h for h in root.handlers if isinstance(h, LineWriterHandler)]
    if ours:  # one writer per process, pointed at today's stdout (tests swap it)
        if ours[0].stream is not sys.stdout:
            ours[0].flush()
            ours[0].stream = sys.stdout
    else:
        handler = LineWriterHandler(sys.stdout)
        handler.setFormatter(CloudRunFormatter())
        root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter at INFO (e.g. HTTP clients) is not the service's story.
    for noisy in ("urllib3", "google", "filelock", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
