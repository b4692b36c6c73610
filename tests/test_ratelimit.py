"""Rate limits: token buckets in process and in a real Redis, and two real servers sharing one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis

from aifn.core.errors import ConfigError
from aifn.http.ratelimit import Decision, MemoryBuckets, RateLimiter, from_settings
from aifn.settings import Rate, Settings, parse_rate

from .helpers import RedisServer, Server, free_port, start_server

ENDPOINT = "/v1/analyze/sentiment"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(**env: str) -> RateLimiter:
    settings = Settings.from_env(default_model_dir=Path("/m"), environ=env)
    built = from_settings(settings, function="sentiment")
    assert built is not None
    return built


# --- the rate and the headers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "rate"),
    [
        ("60/minute", Rate(60, 60.0)),
        ("5/second", Rate(5, 1.0)),
        ("5/s", Rate(5, 1.0)),
        (" 1000 / hour ", Rate(1000, 3600.0)),
        ("10/30s", Rate(10, 30.0)),
        ("2/5minutes", Rate(2, 300.0)),
        ("off", None),
    ],
)
def test_rates_are_parsed(raw: str, rate: Rate | None) -> None:
    assert parse_rate(raw) == rate


@pytest.mark.parametrize("raw", ["60", "0/minute", "5/fortnight", "-1/s", "5/0s", "a/minute"])
def test_a_bad_rate_stops_startup_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"^RATE_LIMIT="):
        Settings.from_env(default_model_dir=Path("/m"), environ={"RATE_LIMIT": raw})


def test_rate_limits_are_off_by_default() -> None:
    settings = Settings.from_env(default_model_dir=Path("/m"), environ={})
    assert settings.rate_limit is None
    assert from_settings(settings, function="sentiment") is None


def test_headers_follow_the_draft() -> None:
    rate = Rate(60, 60.0)
    ok = Decision.of(rate, True, 58.5, "memory").headers()
    assert ok == {
        "RateLimit-Limit": "60",
        "RateLimit-Remaining": "58",
        "RateLimit-Reset": "2",  # 1.5 tokens short of full at 1 per second
        "RateLimit-Policy": "60;w=60",
    }
    refused = Decision.of(rate, False, 0.25, "memory").headers()
    assert refused["RateLimit-Remaining"] == "0"
    assert refused["Retry-After"] == "1"  # 0.75 s to the next token, in whole seconds
    assert refused["RateLimit-Reset"] == "60"


# --- in process -------------------------------------------------------------------------


def test_memory_bucket_bursts_then_refills() -> None:
    clock = Clock()
    buckets = MemoryBuckets(Rate(3, 1.0), clock=clock)
    assert [buckets.take("a")[0] for _ in range(4)] == [True, True, True, False]
    assert buckets.take("b")[0] is True  # another client has its own bucket
    clock.now += 0.2  # 0.6 of a token
    assert buckets.take("a")[0] is False
    clock.now += 0.2  # 1.2 tokens now
    allowed, tokens = buckets.take("a")
    assert allowed
    assert tokens == pytest.approx(0.2)
    clock.now += 10  # never more than the burst
    assert [buckets.take("a")[0] for _ in range(4)] == [True, True, True, False]


def test_a_request_is_charged_per_unit_in_two_steps() -> None:
    """One unit before the body, the rest after: a 10-text request spends 10 tokens."""
    lim = RateLimiter(Rate(12, 60.0), function="t")
    assert lim.check("c").remaining == 11
    decision = lim.charge("c", 10)
    assert (decision.allowed, decision.remaining) == (True, 2)
    # 2 left: a 3-text request gets past its first unit, then is refused for the rest...
    assert lim.check("c").allowed
    refused = lim.charge("c", 3)
    assert not refused.allowed
    # ...keeping that unit spent (its body was read), and told when the whole request passes:
    # 1 token now, 3 needed, at 0.2 per second.
    assert refused.remaining == 1
    assert refused.retry_after == 10
    assert refused.headers()["Retry-After"] == "10"
    assert lim.describe()["limited"] == 1
    assert lim.describe()["units"] == 11  # 1 + 9 + the refused request's first


def test_a_request_bigger_than_the_budget_runs_on_a_full_bucket_into_debt() -> None:
    clock = Clock()
    lim = RateLimiter(Rate(4, 4.0), function="t", memory=MemoryBuckets(Rate(4, 4.0), clock=clock))
    assert lim.check("c").allowed
    big = lim.charge("c", 10)  # never fits in a bucket of 4: admitted when full...
    assert (big.allowed, big.remaining) == (True, 0)
    assert big.reset == 10  # ...leaving it 6 in debt: full again in 10 s at 1 per second
    nxt = lim.check("c")
    assert (nxt.allowed, nxt.retry_after) == (False, 7)  # -6 to 1 token
    clock.now += 7
    assert lim.check("c").allowed
    # Half full, a big one waits for a full bucket.
    clock.now += 2
    assert lim.check("c").allowed
    refused = lim.charge("c", 10)
    assert not refused.allowed
    assert refused.retry_after == 3  # 1 token left, 4 needed


def test_memory_buckets_are_bounded_and_forget_idle_clients() -> None:
    clock = Clock()
    buckets = MemoryBuckets(Rate(5, 60.0), max_clients=100, clock=clock)
    for i in range(1000):
        buckets.take(f"client-{i}")
    assert len(buckets) == 100
    clock.now += 60  # every bucket full again: nothing worth keeping
    buckets.take("new")
    assert len(buckets) == 1


def test_memory_buckets_are_exact_across_threads() -> None:
    buckets = MemoryBuckets(Rate(50, 3600.0))
    allowed: list[bool] = []
    lock = threading.Lock()

    def hammer() -> None:
        for _ in range(25):
            ok = buckets.take("same")[0]
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert allowed.count(True) == 50


# --- in a real Redis ----------------------------------------------------------------------


def test_redis_bucket_bursts_refills_and_never_stores_the_identity(
    redis_server: RedisServer,
) -> None:
    lim = limiter(RATE_LIMIT="5/second", REDIS_URL=redis_server.url)
    decisions = [lim.check("alice@example.com") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert {d.backend for d in decisions} == {"redis"}
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert decisions[-1].retry_after == 1
    time.sleep(0.25)  # 1.25 tokens at 5 per second
    assert lim.check("alice@example.com").allowed
    assert not lim.check("alice@example.com").allowed

    admin = redis.Redis(port=redis_server.port)
    keys = [k.decode() for k in admin.scan_iter("*")]
    assert keys == [lim.key("alice@example.com")]
    assert "alice" not in keys[0]
    assert keys[0].startswith("aifn:rl:v1:sentiment:")
    # The key lives until the bucket would be full again (under 1 s here) plus a second.
    assert 0 < admin.pttl(keys[0]) <= 2000
    admin.close()


def test_redis_charges_units_and_debt_like_memory(redis_server: RedisServer) -> None:
    lim = limiter(RATE_LIMIT="12/minute", REDIS_URL=redis_server.url)
    assert lim.check("c").remaining == 11
    decision = lim.charge("c", 10)
    assert (decision.allowed, decision.remaining, decision.backend) == (True, 2, "redis")
    assert lim.check("c").allowed
    refused = lim.charge("c", 3)
    assert (refused.allowed, refused.remaining, refused.backend) == (False, 1, "redis")
    assert refused.retry_after == 10
    # Bigger than the bucket: admitted full, then in debt (shared by every instance).
    other = limiter(RATE_LIMIT="4/4s", REDIS_URL=redis_server.url)
    assert other.check("d").allowed
    big = other.charge("d", 10)
    assert (big.allowed, big.remaining) == (True, 0)
    assert 9 <= big.reset <= 10
    nxt = limiter(RATE_LIMIT="4/4s", REDIS_URL=redis_server.url).check("d")
    assert (nxt.allowed, nxt.backend) == (False, "redis")
    assert 6 <= nxt.retry_after <= 7
    admin = redis.Redis(port=redis_server.port)
    # The key lives until the debt is paid and the bucket full, plus a second.
    assert 9_000 < admin.pttl(other.key("d")) <= 11_000
    admin.close()


def test_limiters_on_one_redis_share_one_budget_atomically(redis_server: RedisServer) -> None:
    """Two 'instances' (own clients), eight threads each: exactly the budget is allowed."""
    instances = [limiter(RATE_LIMIT="40/hour", REDIS_URL=redis_server.url) for _ in range(2)]
    allowed: list[bool] = []
    lock = threading.Lock()

    def hammer(lim: RateLimiter) -> None:
        for _ in range(10):
            ok = lim.check("203.0.113.9").allowed
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=hammer, args=(instances[n % 2],)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 80
    assert allowed.count(True) == 40
    assert [lim.describe()["fallback"] for lim in instances] == [0, 0]


def test_script_is_reloaded_after_redis_forgets_it(redis_server: RedisServer) -> None:
    lim = limiter(RATE_LIMIT="3/minute", REDIS_URL=redis_server.url)
    assert lim.check("x").remaining == 2
    admin = redis.Redis(port=redis_server.port)
    admin.script_flush()  # what a restart or a failover does to loaded scripts
    admin.close()
    decision = lim.check("x")
    assert (decision.backend, decision.remaining) == ("redis", 1)


def test_unreachable_redis_falls_back_to_in_process_buckets() -> None:
    lim = limiter(
        RATE_LIMIT="2/minute",
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        REDIS_PROBE_SECONDS="60",
    )
    decisions = [lim.check("c") for _ in range(3)]
    assert [(d.allowed, d.backend) for d in decisions] == [
        (True, "memory"),
        (True, "memory"),
        (False, "memory"),
    ]
    assert lim.describe()["state"] == "open"  # 3 failures in a row
    started = time.perf_counter()
    for _ in range(50):
        lim.check("d")
    assert time.perf_counter() - started < 0.5  # an open breaker costs no connection attempts


def test_slow_redis_costs_a_decision_at_most_the_timeout(redis_server: RedisServer) -> None:
    lim = limiter(RATE_LIMIT="2/minute", REDIS_URL=redis_server.url, REDIS_TIMEOUT_MS="200")
    lim.check("warm")  # connect and load the script first
    admin = redis.Redis(port=redis_server.port)
    blocker = threading.Thread(target=lambda: admin.execute_command("DEBUG", "SLEEP", "1.5"))
    blocker.start()
    time.sleep(0.1)
    started = time.perf_counter()
    decision = lim.check("slow")
    assert time.perf_counter() - started < 0.6
    assert (decision.allowed, decision.backend) == (True, "memory")
    blocker.join()
    admin.close()


def test_redis_killed_and_restarted_goes_back_to_shared_buckets(
    redis_server: RedisServer,
) -> None:
    lim = limiter(RATE_LIMIT="2/minute", REDIS_URL=redis_server.url, REDIS_PROBE_SECONDS="0.2")
    assert lim.check("k").backend == "redis"
    redis_server.kill()
    outage = [lim.check(f"o{i}") for i in range(4)]
    assert all(d.allowed and d.backend == "memory" for d in outage)
    assert lim.describe()["state"] == "open"
    redis_server.start()  # same port, empty
    deadline = time.monotonic() + 5
    while lim.describe()["state"] == "open" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lim.describe()["state"] == "closed"
    assert lim.check("k").backend == "redis"
    assert lim.describe()["fallback"] == 4


# --- two real servers, one Redis ------------------------------------------------------------


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def servers(
    sentiment_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    shared_redis: RedisServer,
) -> Iterator[list[Server]]:
    """Two instances sharing one Redis, 3 requests a minute per client address."""
    env = {
        "RATE_LIMIT": "3/minute",
        "REDIS_URL": shared_redis.url,
        "REDIS_PROBE_SECONDS": "0.3",
        "REDIS_TIMEOUT_MS": "200",
    }
    started: list[Server] = []
    try:
        for _ in range(2):
            started.append(start_server(sentiment_model_dir, tmp_path_factory.mktemp("rl"), **env))
        yield started
    finally:
        for server in started:
            stop(server)


def post(
    server: Server, client: str, body: Any = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    # Each test is its own client: the servers count by the X-Forwarded-For entry Cloud Run adds.
    return server.request(
        "POST", ENDPOINT, body or {"text": "Fine."}, headers={"X-Forwarded-For": client}
    )


@pytest.mark.integration
def test_two_servers_share_one_budget_and_refuse_with_429(servers: list[Server]) -> None:
    a, b = servers
    answers = [post(s, "198.51.100.1") for s in (a, b, a, b)]
    assert [status for status, _, _ in answers] == [200, 200, 200, 429]
    assert [h["RateLimit-Remaining"] for _, _, h in answers] == ["2", "1", "0", "0"]
    for _, _, headers in answers:
        assert headers["RateLimit-Limit"] == "3"
        assert headers["RateLimit-Policy"] == "3;w=60"
        assert 1 <= int(headers["RateLimit-Reset"]) <= 60
    status, body, headers = answers[3]
    assert body["error"]["type"] == "rate_limited"
    assert body["error"]["status"] == 429
    assert 1 <= int(headers["Retry-After"]) <= 20  # one token per 20 s
    openapi = a.request("GET", "/openapi.json")[1]
    jsonschema.validate(body, openapi["components"]["schemas"]["Error"])
    assert "`rate_limited`" in openapi["paths"][ENDPOINT]["post"]["responses"]["429"]["description"]
    assert "401" not in openapi["paths"][ENDPOINT]["post"]["responses"]  # API keys are off

    # Refused before the body is looked at: a body that would be a 422 gets the 429.
    req_status = a.request(
        "POST", ENDPOINT, "not an object", headers={"X-Forwarded-For": "198.51.100.1"}
    )[0]
    assert req_status == 429
    # Entries a client writes to the left of the one Cloud Run appends change nothing.
    assert post(b, "10.0.0.1, 198.51.100.1")[0] == 429
    # Another client, and health and the document, are not limited.
    assert post(a, "198.51.100.2")[0] == 200
    for server in (a, b):
        for _ in range(5):
            status, _, headers = server.request("GET", "/v1/health")
            assert status == 200
            assert "RateLimit-Limit" not in headers
        assert server.request("GET", "/openapi.json")[0] == 200


@pytest.mark.integration
def test_a_refused_bad_request_still_counts_and_carries_the_headers(
    servers: list[Server],
) -> None:
    status, body, headers = servers[0].request(
        "POST", ENDPOINT, {"txt": "typo"}, headers={"X-Forwarded-For": "198.51.100.3"}
    )
    assert (status, body["error"]["type"]) == (422, "invalid_request")
    assert headers["RateLimit-Remaining"] == "2"


@pytest.mark.integration
def test_each_text_is_a_unit_of_the_budget(servers: list[Server]) -> None:
    a, b = servers
    texts = {"texts": ["Fine.", "Broken.", "Late again."]}
    status, _, headers = post(a, "198.51.100.20", texts)
    assert (status, headers["RateLimit-Remaining"]) == (200, "0")  # three texts: the budget
    status, body, headers = post(b, "198.51.100.20")
    assert (status, body["error"]["type"]) == (429, "rate_limited")
    # Two texts with one token left: refused once the body is read, Retry-After for both.
    post(a, "198.51.100.21", {"texts": ["One.", "Two."]})
    status, body, headers = post(b, "198.51.100.21", {"texts": ["Three.", "Four."]})
    assert (status, body["error"]["type"]) == (429, "rate_limited")
    assert "2 units of work" in body["error"]["message"]
    assert headers["RateLimit-Remaining"] == "0"
    assert 39 <= int(headers["Retry-After"]) <= 40  # from 0 to 2 tokens at one per 20 s
    # Bigger than the whole budget (5 texts, 3 a minute): admitted on a full bucket, into debt.
    status, body, headers = post(a, "198.51.100.22", {"texts": ["x"] * 5})
    assert status == 200
    assert len(body["results"]) == 5
    status, _, headers = post(b, "198.51.100.22")
    assert status == 429
    assert 59 <= int(headers["Retry-After"]) <= 60  # -2 tokens to 1


@pytest.mark.integration
def test_redis_killed_then_restarted_over_http(
    servers: list[Server], shared_redis: RedisServer
) -> None:
    a, b = servers
    shared_redis.kill()
    # Down: no request fails; each instance decides alone, so a client gets 3 on each.
    during = [post(s, "198.51.100.7")[0] for s in (a, a, a, a, b, b, b, b)]
    assert during == [200, 200, 200, 429, 200, 200, 200, 429]
    for server in (a, b):
        limits = server.request("GET", "/v1/health")[1]["rate_limit"]
        assert (limits["backend"], limits["state"]) == ("redis", "open")
        assert limits["fallback"] >= 4

    shared_redis.start()  # same port, empty
    for server in (a, b):
        deadline = time.monotonic() + 5
        state = "open"
        while state == "open" and time.monotonic() < deadline:
            state = server.request("GET", "/v1/health")[1]["rate_limit"]["state"]
            time.sleep(0.1)
        assert state == "closed"
    # Shared again: one budget across both instances.
    after = [post(s, "198.51.100.8")[0] for s in (a, b, a, b)]
    assert after == [200, 200, 200, 429]
