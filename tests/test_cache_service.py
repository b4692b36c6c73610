"""The prediction cache seen from outside: real servers, a real Redis, faults under load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import RedisServer, Server, start_server

pytestmark = pytest.mark.integration

ENDPOINT = "/v1/analyze/sentiment"


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(timeout=15)


@pytest.fixture
def servers(sentiment_model_dir: Path, tmp_path: Path, redis_server: RedisServer) -> Iterator[list]:
    """Two instances of the sentiment function sharing one Redis, as on Cloud Run."""
    env = {"REDIS_URL": redis_server.url, "REDIS_PROBE_SECONDS": "0.3", "REDIS_TIMEOUT_MS": "200"}
    started = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            started.append(start_server(sentiment_model_dir, tmp_path / name, **env))
        yield started
    finally:
        for server in started:
            stop(server)


def test_memory_cache_answers_repeats_with_identical_results(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    server = start_server(sentiment_model_dir, tmp_path)
    try:
        texts = ["Absolutely love it.", "The parcel arrived on Tuesday."]
        status, first, headers = server.request("POST", ENDPOINT, {"texts": texts})
        assert status == 200
        assert [r["cached"] for r in first["results"]] == [False, False]
        assert headers["Server-Timing"].startswith("app;dur=")
        # A batch with one new text: only that one is computed.
        _, second, _ = server.request(
            "POST", ENDPOINT, {"texts": ["  Absolutely love it. ", "Broken on arrival."]}
        )
        assert [r["cached"] for r in second["results"]] == [True, False]
        first_result = {k: v for k, v in first["results"][0].items() if k != "cached"}
        second_result = {k: v for k, v in second["results"][0].items() if k != "cached"}
        assert second_result == first_result
        _, health, _ = server.request("GET", "/v1/health")
        cache = health["cache"]
        assert (cache["backend"], cache["hits"], cache["misses"]) == ("memory", 1, 3)
    finally:
        stop(server)


def test_instances_share_redis(servers: list[Server]) -> None:
    a, b = servers
    text = {"text": "The support team was wonderful and fixed it in minutes."}
    _, first, _ = a.request("POST", ENDPOINT, text)
    _, second, _ = b.request("POST", ENDPOINT, text)
    assert first["results"][0]["cached"] is False
    assert second["results"][0]["cached"] is True
    assert second["results"][0]["labels"] == first["results"][0]["labels"]
    _, health, _ = b.request("GET", "/v1/health")
    assert (health["cache"]["backend"], health["cache"]["state"]) == ("redis", "closed")


def test_a_caller_never_learns_what_another_sent(servers: list[Server]) -> None:
    """Two instances on one Redis: the same caller hits on either, another caller never does."""
    a, b = servers
    secret = {"text": "My account number is 12345678 and I want to close it."}
    alice, mallory = {"X-Forwarded-For": "203.0.113.10"}, {"X-Forwarded-For": "198.51.100.99"}
    assert a.request("POST", ENDPOINT, secret, headers=alice)[1]["results"][0]["cached"] is False
    _, probe, _ = b.request("POST", ENDPOINT, secret, headers=mallory)
    assert probe["results"][0]["cached"] is False  # was True: the text's presence leaked
    assert b.request("POST", ENDPOINT, secret, headers=alice)[1]["results"][0]["cached"] is True
    _, health, _ = a.request("GET", "/v1/health")
    assert health["cache"]["scope"] == "caller"


def test_api_key_callers_have_their_own_cache_and_shared_scope_shares(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    keys = ["key-one-0123456789abcdef", "key-two-0123456789abcdef"]
    text = {"text": "The refund for order 991 never arrived."}
    (tmp_path / "caller").mkdir()
    (tmp_path / "shared").mkdir()
    scoped = start_server(sentiment_model_dir, tmp_path / "caller", API_KEYS=",".join(keys))
    try:
        one, two = ({"X-API-Key": k} for k in keys)
        first = scoped.request("POST", ENDPOINT, text, headers=one)[1]
        assert first["results"][0]["cached"] is False
        assert scoped.request("POST", ENDPOINT, text, headers=one)[1]["results"][0]["cached"]
        # Same address, another key: another tenant.
        assert not scoped.request("POST", ENDPOINT, text, headers=two)[1]["results"][0]["cached"]
    finally:
        stop(scoped)
    shared = start_server(sentiment_model_dir, tmp_path / "shared", CACHE_SCOPE="shared")
    try:
        first = shared.request("POST", ENDPOINT, text, headers={"X-Forwarded-For": "203.0.113.1"})
        assert first[1]["results"][0]["cached"] is False
        other = shared.request("POST", ENDPOINT, text, headers={"X-Forwarded-For": "198.51.100.1"})
        assert other[1]["results"][0]["cached"] is True
        assert shared.request("GET", "/v1/health")[1]["cache"]["scope"] == "shared"
    finally:
        stop(shared)


def test_batch_files_and_http_callers_never_share_entries(
    sentiment_model_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    """Batch files run in a scope of their own: one Redis, no hits across the two ways in."""
    texts = ["Batch scope: the invoice was wrong twice.", "Batch scope: support fixed it fast."]
    server = start_server(sentiment_model_dir, tmp_path, REDIS_URL=redis_server.url)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODEL_DIR": str(sentiment_model_dir)}
    env["REDIS_URL"] = redis_server.url

    def batch_file(name: str) -> str:
        source = tmp_path / name
        source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        done = subprocess.run(
            [sys.executable, "-m", "aifn.files", str(source), "--function", "sentiment"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    try:
        first = server.request("POST", ENDPOINT, {"text": texts[0]})[1]
        assert first["results"][0]["cached"] is False
        assert ", 0 from the cache)" in batch_file("one.jsonl")  # the caller's entry is not hit
        second = server.request("POST", ENDPOINT, {"text": texts[1]})[1]
        assert second["results"][0]["cached"] is False  # nor the batch file's
        assert ", 2 from the cache)" in batch_file("two.jsonl")  # batch files share theirs
    finally:
        stop(server)


def test_redis_killed_and_restarted_under_load_fails_no_request(
    servers: list[Server], redis_server: RedisServer
) -> None:
    """Four clients for ~4 s; Redis is SIGKILLed after 1 s and back after 2.5 s."""
    statuses: Counter[int] = Counter()
    cached: Counter[bool] = Counter()
    lock = threading.Lock()
    stop_at = time.monotonic() + 4.0

    def client(n: int) -> None:
        server = servers[n % 2]
        i = 0
        while time.monotonic() < stop_at:
            # Half repeats (cache hits while Redis is up), half new texts (model + write).
            text = f"Order {i % 5} arrived and works great." if i % 2 else f"Ticket {n}-{i}."
            status, body, _ = server.request("POST", ENDPOINT, {"text": text})
            with lock:
                statuses[status] += 1
                if status == 200:
                    cached[body["results"][0]["cached"]] += 1
            i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    redis_server.kill()
    time.sleep(1.5)
    redis_server.start()  # empty, on the same port
    for t in threads:
        t.join(30)

    assert set(statuses) == {200}, statuses
    assert statuses[200] > 40
    assert cached[True] > 0
    # After the background probe sees Redis again, both instances use it again.
    for server in servers:
        deadline = time.monotonic() + 5
        state = "open"
        while state != "closed" and time.monotonic() < deadline:
            state = server.request("GET", "/v1/health")[1]["cache"]["state"]
            time.sleep(0.1)
        assert state == "closed"
    text = {"text": "Back again after the outage, and it works."}
    assert servers[0].request("POST", ENDPOINT, text)[1]["results"][0]["cached"] is False
    assert servers[1].request("POST", ENDPOINT, text)[1]["results"][0]["cached"] is True


def test_unreachable_redis_never_delays_startup_or_answers(
    sentiment_model_dir: Path, tmp_path: Path
) -> None:
    from .helpers import free_port

    server = start_server(
        sentiment_model_dir,
        tmp_path,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        REDIS_PROBE_SECONDS="60",
    )
    try:
        for i in range(5):
            status, body, _ = server.request("POST", ENDPOINT, {"text": f"Fine, thanks {i}."})
            assert status == 200
            assert body["results"][0]["cached"] is False
        cache = server.request("GET", "/v1/health")[1]["cache"]
        assert cache["state"] == "open"
        assert cache["errors"]["skipped"] > 0
        warnings = [
            line
            for line in server.log_lines()
            if line.get("severity") == "WARNING" and "cache" in line.get("message", "")
        ]
        assert 1 <= len(warnings) <= 2  # logged once, not once per request
    finally:
        stop(server)
