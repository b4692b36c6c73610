"""End to end: a real ``functions-framework`` process (gunicorn), spoken to over HTTP."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from benchlib import function_command

from .helpers import REPO, Server, free_port, start_server

pytestmark = pytest.mark.integration

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PRIVATE_TEXT = "my private note about the quarterly numbers, which are wonderful"


@pytest.fixture(scope="module")
def server(sentiment_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(sentiment_model_dir, tmp_path_factory.mktemp("server"))
    yield srv
    if srv.proc.poll() is None:
        srv.proc.kill()
        srv.proc.wait()


def test_health_is_ready_as_soon_as_the_port_opens(server: Server) -> None:
    # The model loads and warms up before functions-framework binds the port.
    status, body, _ = server.request("GET", "/v1/health")
    assert status == 200
    assert body["status"] == "ok"


def test_predicts_over_http(server: Server) -> None:
    status, body, headers = server.request(
        "POST",
        "/v1/analyze/sentiment",
        {"texts": ["I love it, brilliant!", "Dreadful, I want a refund."]},
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert [r["label"] for r in body["results"]] == ["POSITIVE", "NEGATIVE"]


def test_concurrent_requests_all_succeed_and_match_sequential_answers(server: Server) -> None:
    # gunicorn serves these on several threads at once; the model and tokenizer must cope.
    texts = [
        "Absolutely brilliant, I am delighted.",
        "This is the worst service I have ever had.",
        "Very happy with the quick delivery!",
        "Awful quality, it fell apart immediately.",
    ]
    expected = {t: server.request("POST", "/v1/analyze/sentiment", {"text": t})[1] for t in texts}
    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(
                lambda t: (t, server.request("POST", "/v1/analyze/sentiment", {"text": t})),
                texts * 6,
            )
        )
    for text, (status, body, _) in answers:
        assert status == 200
        assert body["results"][0]["label"] == expected[text]["results"][0]["label"]
        assert body["results"][0]["score"] == pytest.approx(
            expected[text]["results"][0]["score"], abs=1e-5
        )


def test_logs_are_structured_with_trace_and_without_text(server: Server) -> None:
    status, _, _ = server.request(
        "POST",
        "/v1/analyze/sentiment",
        {"text": PRIVATE_TEXT},
        headers={"traceparent": f"00-{TRACE_ID}-b7ad6b7169203331-01"},
    )
    assert status == 200
    status, _, _ = server.request(
        "POST",
        "/v1/analyze/sentiment",
        {"texts": []},
        headers={"X-Cloud-Trace-Context": f"{TRACE_ID.upper()}/1;o=1"},
    )
    assert status == 422
    traced = [
        line
        for line in server.log_lines()  # waits until the log is written up to here
        if line.get("logging.googleapis.com/trace") == f"projects/test-project/traces/{TRACE_ID}"
    ]
    ok, bad = traced[0], traced[1]
    assert ok["severity"] == "INFO"
    assert ok["httpRequest"]["status"] == 200
    assert ok["httpRequest"]["requestMethod"] == "POST"
    assert ok["httpRequest"]["latency"].endswith("s")
    assert ok["logging.googleapis.com/spanId"] == "b7ad6b7169203331"
    assert bad["httpRequest"]["status"] == 422
    assert bad["error_type"] == "invalid_request"
    assert PRIVATE_TEXT not in server.log_text()


def test_sigterm_finishes_in_flight_work_and_exits(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    srv = start_server(sentiment_model_dir, tmp_path)
    try:
        assert srv.request("GET", "/v1/health")[0] == 200

        # Enough work that the requests are still running when the signal arrives: distinct
        # texts, since identical ones would be computed once and shared (single-flight).
        def batch(r: int) -> dict[str, list[str]]:
            return {
                "texts": [
                    f"Request {r}, review {i}: " + "the plot was fine but slow. " * 30
                    for i in range(16)
                ]
            }

        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(srv.request, "POST", "/v1/analyze/sentiment", batch(r))
                for r in range(4)
            ]
            time.sleep(0.5)
            assert not all(f.done() for f in futures), "requests finished before SIGTERM"
            srv.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            statuses = [f.result(timeout=30)[0] for f in futures]
        code = srv.proc.wait(timeout=30)
        elapsed = time.monotonic() - started
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
    assert statuses == [200] * 4
    assert code == 0
    # Cloud Run sends SIGKILL 10 s after SIGTERM.
    assert elapsed < 10


def test_a_missing_model_stops_startup_with_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        function_command("sentiment", free_port()),
        env={**os.environ, "MODEL_DIR": str(tmp_path / "nothing-here")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "does not exist" in result.stderr + result.stdout
    assert "make model" in result.stderr + result.stdout


def test_an_invalid_setting_stops_startup(sentiment_model_dir: Path) -> None:
    result = subprocess.run(
        function_command("sentiment", free_port()),
        env={**os.environ, "MODEL_DIR": str(sentiment_model_dir), "MAX_BATCH_TEXTS": "zero"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "MAX_BATCH_TEXTS='zero' is invalid" in result.stderr


def _start_fails(target: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        function_command(target, free_port()),
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    return result.stderr + result.stdout


def test_sentiment_refuses_an_encoder_model() -> None:
    out = _start_fails("sentiment", {"MODEL_DIR": str(REPO / "models" / "classify")})
    assert "holds an encoder model; this function serves classifier models" in out


def test_classify_refuses_an_invalid_setting_of_its_own() -> None:
    out = _start_fails("classify", {"MAX_LABELS": "1"})
    assert "classify: configuration error: MAX_LABELS='1' is invalid: must be at least 2" in out
