"""Dynamic batching in a real server: merged batches give the same answers; a full queue is 429."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .helpers import start_server

pytestmark = pytest.mark.integration

ENDPOINT = "/v1/analyze/sentiment"
TEXTS = [
    f"{opening} {detail}"
    for opening in ("I love it.", "It broke again.", "The box arrived.", "Not bad at all.")
    for detail in ("Fast delivery.", "Support never answered my emails.", "It is blue.", "OK.")
]


def test_concurrent_requests_share_batches_and_get_their_own_answers(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    # The served (int8) graph: batching must not change a text's answer, to the last digit.
    server = start_server(sentiment_model_dir, tmp_path, CACHE_MAX_ENTRIES="0")
    try:
        alone = {t: server.request("POST", ENDPOINT, {"text": t})[1]["results"][0] for t in TEXTS}
        with ThreadPoolExecutor(16) as pool:
            replies = list(
                pool.map(lambda t: server.request("POST", ENDPOINT, {"text": t}), TEXTS * 3)
            )
        for text, (status, body, _) in zip(TEXTS * 3, replies, strict=True):
            assert status == 200
            result = body["results"][0]
            assert result["labels"] == alone[text]["labels"]
        health = server.request("GET", "/v1/health")[1]
        batching = health["batching"]
        assert batching["largest"] > 1  # some requests really were merged
        assert batching["batches"] < batching["texts"]
        # Every text was either run by the model or shared another request's identical run.
        assert batching["texts"] + health["cache"]["coalesced"] == len(TEXTS) * 4
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=15)


def test_a_full_queue_answers_429_with_retry_after_and_nothing_else(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    server = start_server(
        sentiment_model_dir, tmp_path, CACHE_MAX_ENTRIES="0", MAX_QUEUED_TEXTS="4", THREADS="32"
    )
    try:
        # Distinct long texts: identical ones would wait on each other (single-flight), not queue.
        def send(i: int) -> tuple:
            body = {"texts": [f"review {i}: " + "word " * 200, f"note {i}: " + "long text " * 90]}
            return server.request("POST", ENDPOINT, body)

        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(send, range(64)))
        statuses = Counter(status for status, _, _ in replies)
        assert set(statuses) == {200, 429}, statuses
        assert statuses[429] > 0
        for status, reply, headers in replies:
            if status == 429:
                assert reply["error"]["type"] == "overloaded"
                assert int(headers["Retry-After"]) >= 1
        assert server.request("GET", "/v1/health")[1]["batching"]["refused"] == statuses[429]
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=15)
