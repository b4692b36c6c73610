"""Unit tests: trace-context parsing and the Cloud Run JSON log format."""

from __future__ import annotations

import json
import logging

import pytest

from aifn import logs

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("traceparent", "cloud", "expected"),
    [
        (
            f"00-{TRACE}-00f067aa0ba902b7-01",
            None,
            logs.TraceContext(TRACE, "00f067aa0ba902b7", True),
        ),
        (
            f"00-{TRACE}-00f067aa0ba902b7-00",
            None,
            logs.TraceContext(TRACE, "00f067aa0ba902b7", False),
        ),
        (None, f"{TRACE}/1;o=1", logs.TraceContext(TRACE, "0000000000000001", True)),
        (None, f"{TRACE.upper()}", logs.TraceContext(TRACE, None, False)),
        ("garbage", f"{TRACE}/255;o=0", logs.TraceContext(TRACE, "00000000000000ff", False)),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None, None),
        ("nonsense", "also nonsense", None),
        (None, None, None),
    ],
)
def test_parse_trace(traceparent, cloud, expected) -> None:
    assert logs.parse_trace(traceparent, cloud) == expected


def _format(record_msg: str, *, project: str | None, trace: logs.TraceContext | None, **extra):
    logs._project = project
    token = logs.set_trace(trace)
    try:
        record = logging.LogRecord("t", logging.WARNING, __file__, 1, record_msg, (), None)
        for key, value in extra.items():
            setattr(record, key, value)
        return json.loads(logs.CloudRunFormatter().format(record))
    finally:
        logs.reset_trace(token)
        logs._project = None


def test_log_line_is_cloud_run_structured_json() -> None:
    entry = _format(
        "hello",
        project="proj",
        trace=logs.TraceContext(TRACE, "00f067aa0ba902b7", True),
        fields={"httpRequest": {"status": 200}},
    )
    assert entry["severity"] == "WARNING"
    assert entry["message"] == "hello"
    assert entry["logging.googleapis.com/trace"] == f"projects/proj/traces/{TRACE}"
    assert entry["logging.googleapis.com/spanId"] == "00f067aa0ba902b7"
    assert entry["logging.googleapis.com/trace_sampled"] is True
    assert entry["httpRequest"] == {"status": 200}


def test_without_a_project_the_trace_id_is_logged_bare() -> None:
    entry = _format("x", project=None, trace=logs.TraceContext(TRACE, None, False))
    assert entry["logging.googleapis.com/trace"] == TRACE
    assert "logging.googleapis.com/spanId" not in entry


def test_exceptions_carry_their_stack_trace() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(logs.CloudRunFormatter().format(record))
    assert entry["severity"] == "ERROR"
    assert "ValueError: boom" in entry["stack_trace"]
    assert entry["message"].startswith("failed\nTraceback")


@pytest.mark.parametrize(
    ("traceparent", "cloud"),
    [
        (None, f"{TRACE}/{'9' * 5000}"),  # int() refuses > 4,300 digits: was a 500 on every path
        (None, f"{TRACE}/{2**64}"),  # a span id is an unsigned 64-bit number
        (None, f"{TRACE}/" + "\u0669\u0660"),  # `\d` matched Arabic-Indic digits
        (None, f"{'0' * 32}/1"),
        (None, TRACE + "/1" * 10_000),
        ("ff-" + TRACE + "-00f067aa0ba902b7-01", None),  # version ff is invalid
        (f"00-{TRACE}-{'0' * 16}-01", None),  # so is an all-zero parent id
        ("0" * 100_000, "a" * 100_000),
    ],
)
def test_a_bad_trace_header_is_ignored(traceparent, cloud) -> None:
    assert logs.parse_trace(traceparent, cloud) is None


def test_the_largest_span_id_is_kept() -> None:
    assert logs.parse_trace(None, f"{TRACE}/{2**64 - 1}") == logs.TraceContext(
        TRACE, "ffffffffffffffff", False
    )
