"""Unit tests: trace-context parsing and the Cloud Run JSON log format."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

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


# -- the writer ---------------------------------------------------------------------------------


class _Stream:
    """A stdout stand-in that can be stalled, as a pipe nobody reads is."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.flowing = threading.Event()
        self.flowing.set()

    def write(self, text: str) -> None:
        self.flowing.wait()
        self.parts.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        return "".join(self.parts).splitlines()


def _handler(stream: _Stream, **kwargs) -> logging.Logger:
    handler = logs.LineWriterHandler(stream, **kwargs)
    handler.setFormatter(logs.CloudRunFormatter())
    logger = logging.Logger(f"t{id(stream)}")
    logger.addHandler(handler)
    return logger


def test_lines_from_many_threads_arrive_whole_and_each_threads_in_order() -> None:
    stream = _Stream()
    logger = _handler(stream)

    def work(n: int) -> None:
        for i in range(2000):
            logger.warning("line", extra={"fields": {"thread": n, "i": i}})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logger.handlers[0].flush()  # returns once everything logged before it is written
    entries = [json.loads(line) for line in stream.lines()]
    assert len(entries) == 8 * 2000
    for n in range(8):
        assert [e["i"] for e in entries if e["thread"] == n] == list(range(2000))


def test_a_stalled_stdout_neither_blocks_a_few_lines_nor_grows_memory_without_bound() -> None:
    stream = _Stream()
    logger = _handler(stream, max_queued=100)
    logger.warning("first")  # starts the writer
    logger.handlers[0].flush()
    stream.flowing.clear()  # nobody reads stdout any more
    started = time.monotonic()
    for i in range(50):
        logger.warning("queued %d", i)
    assert time.monotonic() - started < 1.0  # logging does no I/O itself
    flooding = threading.Thread(target=lambda: [logger.warning("flood") for _ in range(500)])
    flooding.start()
    flooding.join(timeout=1.0)
    assert flooding.is_alive()  # past max_queued lines, a logging thread waits for the writer
    handler = logger.handlers[0]
    assert isinstance(handler, logs.LineWriterHandler)
    assert handler._queue.qsize() <= 100 + 2 * logs.LineWriterHandler._BATCH
    stream.flowing.set()
    flooding.join(timeout=30)
    handler.flush()
    assert len(stream.lines()) == 1 + 50 + 500


def test_no_line_is_lost_or_written_twice_across_a_fork_and_an_exit(tmp_path) -> None:
    script = tmp_path / "fork.py"
    script.write_text(
        "import logging, os, sys\n"
        "from aifn import logs\n"
        "logs.configure('INFO', None)\n"
        "log = logging.getLogger('t')\n"
        "for i in range(5000):\n"
        "    log.info('before %d', i)\n"
        "pid = os.fork()\n"  # gunicorn forks its worker after the function logged its start
        "if pid == 0:\n"
        "    log.info('child')\n"
        "    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "for i in range(5000):\n"
        "    log.info('after %d', i)\n",
        encoding="utf-8",
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=True
    )
    messages = [json.loads(line)["message"] for line in run.stdout.splitlines()]
    assert messages.count("child") == 1
    assert [m for m in messages if m.startswith("before")] == [f"before {i}" for i in range(5000)]
    assert [m for m in messages if m.startswith("after")] == [f"after {i}" for i in range(5000)]
