"""The prediction cache: unit behaviour, and a real redis-server (AUTH, TLS, garbage, outages)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aifn.core import cache
from aifn.core.cache import (
    BATCH_SCOPE,
    CircuitBreaker,
    MemoryBackend,
    PredictionCache,
    RedisBackend,
    caller_scope,
)
from aifn.core.errors import ConfigError
from aifn.core.model import Scores
from aifn.settings import Settings

from .helpers import RedisServer, free_port

WIDTH = 3


class Model:
    """A stand-in for the model in unit tests: deterministic scores, and a record of each call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> list[Scores]:
        self.calls.append(list(texts))
        return [Scores((len(t) / 100, 0.5, 1 - len(t) / 100), len(t) > 50) for t in texts]


def settings(**env: str) -> Settings:
    return Settings.from_env(default_model_dir=Path("m"), environ=env)


def memory_cache(namespace: str = "sentiment:sha256:aaaa", **kwargs: Any) -> PredictionCache:
    return PredictionCache(MemoryBackend(100), namespace=namespace, ttl=60, **kwargs)


def run(c: PredictionCache, texts: list[str], model: Model, params: Any = None) -> list:
    return c.get_or_compute(texts, params=params, width=WIDTH, compute=model)


def test_values_round_trip_exactly_and_compactly() -> None:
    scores = Scores((0.1, 1 / 3, 0.0, 1e-300), truncated=True)
    raw = cache.encode(scores)
    assert len(raw) == 2 + 8 * 4
    assert cache.decode(raw, 4) == scores


@pytest.mark.parametrize(
    "raw",
    [
        b"garbage",
        b"",
        cache.encode(Scores((0.1, 0.2), False)),  # two scores where three are expected
        b"\x02\x00" + b"\x00" * 24,  # unknown version
        b"\x01\x04" + b"\x00" * 24,  # unknown flag
        cache.encode(Scores((0.1, math.nan, 0.2), False)),
    ],
)
def test_damaged_values_are_refused(raw: bytes) -> None:
    with pytest.raises(cache.CorruptValue):
        cache.decode(raw, WIDTH)


def test_normalisation_only_drops_what_the_tokenizer_ignores() -> None:
    assert cache.normalise("  Great\tproduct!\n\n") == "Great product!"
    assert cache.normalise("cafe\u0301") == "caf\u00e9"
    assert cache.normalise("Great") != cache.normalise("great")


def test_memory_backend_evicts_least_recent_and_expires() -> None:
    now = [0.0]
    backend = MemoryBackend(2, clock=lambda: now[0])
    backend.set_many({"a": b"1", "b": b"2"}, ttl=10)
    assert backend.get_many(["a"]) == [b"1"]  # a is now the most recent
    backend.set_many({"c": b"3"}, ttl=10)
    assert backend.get_many(["a", "b", "c"]) == [b"1", None, b"3"]
    now[0] = 10.0
    assert backend.get_many(["a", "c"]) == [None, None]
    assert len(backend) == 0


def test_a_batch_computes_only_its_misses_once_each() -> None:
    c, model = memory_cache(), Model()
    first = run(c, ["a", "b"], model)
    assert [cached for _, cached in first] == [False, False]
    second = run(c, ["b", "c", "a", "c", "  c "], model)
    assert model.calls == [["a", "b"], ["c"]]
    assert [cached for _, cached in second] == [True, False, True, False, False]
    assert second[0][0] == first[1][0]
    assert (c.stats.hits, c.stats.misses) == (2, 5)


def test_hits_are_identical_to_fresh_answers() -> None:
    c, model = memory_cache(), Model()
    fresh = run(c, ["x" * 60], model)[0]
    again = run(c, ["x" * 60], model)[0]
    assert again == (fresh[0], True)
    assert again[0].truncated is True


def test_model_revision_and_parameters_are_part_of_the_key() -> None:
    backend, model = MemoryBackend(100), Model()
    old = PredictionCache(backend, namespace="classify:sha256:old", ttl=60)
    new = PredictionCache(backend, namespace="classify:sha256:new", ttl=60)
    run(old, ["t"], model, {"prompts": ["a", "b", "c"]})
    run(new, ["t"], model, {"prompts": ["a", "b", "c"]})
    run(old, ["t"], model, {"prompts": ["a", "b", "d"]})
    assert run(old, ["t"], model, {"prompts": ["a", "b", "c"]})[0][1] is True
    assert len(model.calls) == 3


def test_a_caller_only_hits_entries_its_own_identity_wrote() -> None:
    c, model = memory_cache(), Model()
    with caller_scope("key:aaaaaaaaaaaa"):
        assert run(c, ["my secret text"], model)[0][1] is False
        assert run(c, ["my secret text"], model)[0][1] is True
    with caller_scope("key:bbbbbbbbbbbb"):  # someone else asking: no trace of the first
        assert run(c, ["my secret text"], model)[0][1] is False
    # Outside any request (a batch file) is a scope of its own, too.
    assert run(c, ["my secret text"], model)[0][1] is False
    assert len(model.calls) == 3
    assert c.describe()["scope"] == "caller"


def test_concurrent_misses_of_two_callers_are_not_coalesced() -> None:
    """Waiting on another caller's computation would leak it through timing: never shared."""
    c = memory_cache()
    started, release = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def slow(texts: list[str]) -> list[Scores]:
        calls.append(list(texts))
        started.set()
        release.wait(10)
        return [Scores((0.2, 0.3, 0.5), False) for _ in texts]

    def ask(scope: str) -> None:
        with caller_scope(scope):
            c.get_or_compute(["same"], params=None, width=3, compute=slow)

    first = threading.Thread(target=ask, args=("addr:203.0.113.1",))
    first.start()
    started.wait(10)
    second = threading.Thread(target=ask, args=("addr:203.0.113.2",))
    second.start()
    time.sleep(0.2)
    release.set()
    first.join(10)
    second.join(10)
    assert calls == [["same"], ["same"]]
    assert c.stats.coalesced == 0


def test_shared_scope_is_one_namespace_with_the_old_keys() -> None:
    backend, model = MemoryBackend(100), Model()
    shared = PredictionCache(backend, namespace="sentiment:sha256:aaaa", ttl=60, scope="shared")
    with caller_scope("key:aaaaaaaaaaaa"):
        run(shared, ["t"], model)
        key = shared.key("t", None)
    with caller_scope("key:bbbbbbbbbbbb"):
        assert run(shared, ["t"], model)[0][1] is True
    assert run(shared, ["t"], model)[0][1] is True  # batch files too
    assert len(model.calls) == 1
    assert key.count(":") == 3  # aifn:v1:<function>:<hash>, as before scopes existed
    scoped = PredictionCache(backend, namespace="sentiment:sha256:aaaa", ttl=60)
    with caller_scope("key:aaaaaaaaaaaa"):
        own = scoped.key("t", None)
    with caller_scope("key:bbbbbbbbbbbb"):
        other = scoped.key("t", None)
    # aifn:v1:<function>:<scope hash>:<hash>: a caller's entries share a prefix, which names
    # nobody (no key, address or principal in clear).
    assert own.count(":") == other.count(":") == 4
    assert own.rsplit(":", 1)[0] != other.rsplit(":", 1)[0]
    assert "aaaaaaaaaaaa" not in own


def test_cache_scope_setting() -> None:
    assert cache.from_settings(settings(), function="f", revision="r").scope == "caller"
    assert (
        cache.from_settings(settings(CACHE_SCOPE="shared"), function="f", revision="r").scope
        == "shared"
    )
    with pytest.raises(ConfigError, match=r"^CACHE_SCOPE="):
        settings(CACHE_SCOPE="everyone")
    assert cache.current_scope() == BATCH_SCOPE


def test_concurrent_identical_misses_compute_once() -> None:
    c = memory_cache()
    started, release = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def slow(texts: list[str]) -> list[Scores]:
        calls.append(list(texts))
        started.set()
        release.wait(10)
        return [Scores((0.2, 0.3, 0.5), False) for _ in texts]

    results: list[Any] = []
    first = threading.Thread(
        target=lambda: results.append(
            c.get_or_compute(["same"], params=None, width=3, compute=slow)
        )
    )
    first.start()
    started.wait(10)
    second = threading.Thread(
        target=lambda: results.append(
            c.get_or_compute(["same"], params=None, width=3, compute=slow)
        )
    )
    second.start()
    time.sleep(0.2)  # the second request is now waiting on the first's computation
    release.set()
    first.join(10)
    second.join(10)
    assert calls == [["same"]]
    assert results[0] == results[1]
    assert c.stats.coalesced == 1


def test_a_request_waiting_on_a_computation_that_fails_computes_its_texts_itself() -> None:
    c = memory_cache()
    started, release = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def first_fails(texts: list[str]) -> list[Scores]:
        calls.append(list(texts))
        if len(calls) == 1:
            started.set()
            release.wait(10)
            raise RuntimeError("queue full")  # e.g. the owner's request was refused
        return [Scores((0.2, 0.3, 0.5), False) for _ in texts]

    outcome: list[Any] = []

    def owner() -> None:
        try:
            c.get_or_compute(["a", "b"], params=None, width=3, compute=first_fails)
        except RuntimeError as exc:
            outcome.append(exc)

    first = threading.Thread(target=owner)
    first.start()
    started.wait(10)
    waiter = threading.Thread(
        target=lambda: outcome.append(
            c.get_or_compute(["b", "c"], params=None, width=3, compute=first_fails)
        )
    )
    waiter.start()
    time.sleep(0.2)  # the waiter computes "c" and waits on the owner for "b"
    release.set()
    first.join(10)
    waiter.join(10)
    assert isinstance(outcome[0], RuntimeError)
    assert [s for s, _ in outcome[1]] == [Scores((0.2, 0.3, 0.5), False)] * 2
    assert calls == [["a", "b"], ["c"], ["b"]]
    assert c.stats.coalesced == 0


def test_a_failed_computation_is_not_cached_and_is_retried() -> None:
    c = memory_cache()

    def broken(texts: list[str]) -> list[Scores]:
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        c.get_or_compute(["t"], params=None, width=3, compute=broken)
    model = Model()
    assert run(c, ["t"], model)[0][1] is False
    assert model.calls == [["t"]]


def test_memory_cache_is_the_default_and_size_zero_turns_it_off() -> None:
    default = cache.from_settings(settings(), function="sentiment", revision="sha256:x")
    assert default.describe()["backend"] == "memory"
    off = cache.from_settings(
        settings(CACHE_MAX_ENTRIES="0"), function="sentiment", revision="sha256:x"
    )
    model = Model()
    run(off, ["t"], model)
    assert run(off, ["t"], model)[0][1] is False
    assert off.describe()["backend"] == "off"


def test_secrets_never_appear_in_settings_repr_or_errors() -> None:
    s = settings(REDIS_URL="redis://:hunter2@localhost:6379/0", REDIS_AUTH="s3cret")
    assert "hunter2" not in repr(s)
    assert "s3cret" not in repr(s)
    with pytest.raises(ConfigError) as info:
        settings(REDIS_URL="http://:hunter2@localhost")
    assert "hunter2" not in str(info.value)
    assert "REDIS_URL" in str(info.value)


# --- Against a real redis-server ------------------------------------------------------------


_opened: list[PredictionCache] = []


@pytest.fixture(autouse=True)
def _close_redis_clients() -> Iterator[None]:
    yield
    while _opened:
        backend = _opened.pop().backend
        if isinstance(backend, RedisBackend):
            backend.close()


def redis_cache(**env: str) -> PredictionCache:
    s = settings(REDIS_TIMEOUT_MS="300", REDIS_PROBE_SECONDS="0.2", **env)
    c = cache.from_settings(s, function="sentiment", revision="sha256:abc")
    _opened.append(c)
    return c


def test_redis_hit_and_miss_with_one_round_trip_each_way(redis_server: RedisServer) -> None:
    c, model = redis_cache(REDIS_URL=redis_server.url), Model()
    assert c.describe()["backend"] == "redis"
    run(c, ["a", "b"], model)
    result = run(c, ["a", "b", "c"], model)
    assert [cached for _, cached in result] == [True, True, False]
    assert model.calls == [["a", "b"], ["c"]]
    client = c.backend.client  # type: ignore[union-attr]
    keys = sorted(k.decode() for k in client.keys("*"))
    assert len(keys) == 3
    assert all(k.startswith("aifn:v1:sentiment:") for k in keys)
    assert 0 < client.ttl(keys[0]) <= 86_400
    assert client.strlen(keys[0]) == 2 + 8 * WIDTH


def test_redis_values_expire_after_the_ttl(redis_server: RedisServer) -> None:
    c, model = redis_cache(REDIS_URL=redis_server.url, CACHE_TTL_SECONDS="1"), Model()
    run(c, ["t"], model)
    assert run(c, ["t"], model)[0][1] is True
    time.sleep(2.1)
    assert run(c, ["t"], model)[0][1] is False


def test_garbage_in_a_key_is_a_miss_and_is_replaced(redis_server: RedisServer) -> None:
    c, model = redis_cache(REDIS_URL=redis_server.url), Model()
    key = c.key("t", None)
    client = c.backend.client  # type: ignore[union-attr]
    client.set(key, b"\xff not a prediction")
    assert run(c, ["t"], model)[0][1] is False
    assert c.describe()["errors"] == {"corrupt": 1}
    assert run(c, ["t"], model)[0][1] is True  # the fresh answer overwrote the garbage


def test_redis_with_auth_as_terraform_passes_it(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, "--requirepass", "s3cret-auth")
    server.start()
    try:
        good = redis_cache(
            REDIS_HOST="127.0.0.1", REDIS_PORT=str(server.port), REDIS_AUTH="s3cret-auth"
        )
        model = Model()
        run(good, ["t"], model)
        assert run(good, ["t"], model)[0][1] is True
        # A wrong AUTH string: every request still answers, from the model.
        bad = redis_cache(REDIS_HOST="127.0.0.1", REDIS_PORT=str(server.port), REDIS_AUTH="nope")
        assert [cached for _, cached in run(bad, ["t", "u"], model)] == [False, False]
        assert bad.describe()["errors"]["read"] >= 1
    finally:
        server.kill()


def test_redis_over_tls_with_the_ca_certificate(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca.cert_pem.write_to_path(str(ca_file))
    tls_port = free_port()
    server = RedisServer(
        tmp_path,
        *("--port", "0", "--tls-port", str(tls_port)),
        *("--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)),
        *("--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"),
    )
    server.start()
    try:
        # Memorystore style: host, port and the CA certificate's PEM text.
        pem = ca_file.read_text()
        memorystore = redis_cache(
            REDIS_HOST="127.0.0.1", REDIS_PORT=str(tls_port), REDIS_CA_CERT=pem
        )
        model = Model()
        run(memorystore, ["t"], model)
        assert run(memorystore, ["t"], model)[0][1] is True
        # URL style: rediss:// with the CA as a file.
        url = redis_cache(REDIS_URL=f"rediss://127.0.0.1:{tls_port}/0", REDIS_CA_CERT=str(ca_file))
        assert run(url, ["t"], model)[0][1] is True
        # Without the CA the server's certificate is not trusted: a miss, never an error.
        untrusted = redis_cache(REDIS_URL=f"rediss://127.0.0.1:{tls_port}/0")
        assert run(untrusted, ["t"], model)[0][1] is False
        assert untrusted.describe()["errors"]["read"] == 1
    finally:
        server.kill()


def test_every_ca_of_a_rotating_memorystore_is_trusted(tmp_path: Path) -> None:
    """Memorystore lists two server CAs during a rotation; the server may present a certificate
    from either. Whatever way the bundle was joined, every CA in it is trusted."""
    trustme = pytest.importorskip("trustme")
    old, new = trustme.CA(), trustme.CA()
    cert = new.issue_cert("127.0.0.1")  # the server already moved to the new CA
    cert_file, key_file, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    new.cert_pem.write_to_path(str(ca_file))
    tls_port = free_port()
    server = RedisServer(
        tmp_path,
        *("--port", "0", "--tls-port", str(tls_port)),
        *("--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file)),
        *("--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no"),
    )
    server.start()
    try:
        pems = [ca.cert_pem.bytes().decode("ascii").strip() for ca in (old, new)]
        bundles = {
            "one per line": "\n".join(pems) + "\n",
            "joined with nothing between": "".join(pems),
            "CRLF": "\r\n".join(pems).replace("\n", "\r\n"),
            "one-line with \\n escapes": "".join(pems).replace("\n", "\\n"),
        }
        model = Model()
        for name, pem in bundles.items():
            assert len(cache.ca_bundle(pem)) == 2, name
            memorystore = redis_cache(
                REDIS_HOST="127.0.0.1", REDIS_PORT=str(tls_port), REDIS_CA_CERT=pem
            )
            run(memorystore, [name], model)
            assert run(memorystore, [name], model)[0][1] is True, name
            assert memorystore.describe()["errors"] == {}, name
            bundle_file = tmp_path / "bundle.pem"
            bundle_file.write_text(pem)
            url = redis_cache(
                REDIS_URL=f"rediss://127.0.0.1:{tls_port}/0", REDIS_CA_CERT=str(bundle_file)
            )
            assert run(url, [name], model)[0][1] is True, name
        # Only the old CA: the server is not trusted (a miss, never an error).
        only_old = redis_cache(
            REDIS_HOST="127.0.0.1", REDIS_PORT=str(tls_port), REDIS_CA_CERT=pems[0]
        )
        assert run(only_old, ["one per line"], model)[0][1] is False
    finally:
        server.kill()


def test_a_ca_setting_without_a_certificate_is_a_configuration_error() -> None:
    for value in ("-----BEGIN CERTIFICATE-----\n-----END", "-----BEGIN PRIVATE KEY-----\nAA=="):
        with pytest.raises(ConfigError, match="REDIS_CA_CERT"):
            redis_cache(REDIS_HOST="127.0.0.1", REDIS_CA_CERT=value)


def test_missing_ca_file_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="REDIS_CA_CERT"):
        redis_cache(REDIS_HOST="127.0.0.1", REDIS_CA_CERT="/nonexistent/ca.pem")


def test_dead_redis_opens_the_breaker_and_costs_no_more_calls() -> None:
    c, model = redis_cache(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0"), Model()
    for i in range(3):
        assert run(c, [f"t{i}"], model)[0][1] is False
    assert c.describe()["state"] == "open"
    started = time.perf_counter()
    for i in range(20):
        run(c, [f"u{i}"], model)
    assert c.describe()["errors"]["skipped"] >= 40  # 20 reads and 20 writes not attempted
    assert time.perf_counter() - started < 1.0


def test_slow_redis_costs_at_most_the_timeout(redis_server: RedisServer) -> None:
    c, model = redis_cache(REDIS_URL=redis_server.url), Model()
    admin = RedisBackend(__import__("redis").Redis(port=redis_server.port))
    blocker = threading.Thread(target=lambda: admin.client.execute_command("DEBUG", "SLEEP", "2"))
    blocker.start()
    time.sleep(0.1)
    started = time.perf_counter()
    assert run(c, ["t"], model)[0][1] is False
    # One read and one write, each cut off at REDIS_TIMEOUT_MS (300 ms).
    assert time.perf_counter() - started < 1.0
    blocker.join()
    admin.close()


def test_breaker_closes_again_when_redis_comes_back(redis_server: RedisServer) -> None:
    c, model = redis_cache(REDIS_URL=redis_server.url), Model()
    run(c, ["t"], model)
    redis_server.kill()
    for i in range(3):
        run(c, [f"x{i}"], model)
    assert c.describe()["state"] == "open"
    redis_server.start()  # same port, empty
    deadline = time.monotonic() + 5
    while c.describe()["state"] == "open" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.describe()["state"] == "closed"
    run(c, ["t"], model)
    assert run(c, ["t"], model)[0][1] is True


def test_breaker_unit() -> None:
    probes: list[int] = []
    ok = threading.Event()

    def probe() -> None:
        probes.append(1)
        if not ok.is_set():
            raise ConnectionError("down")

    breaker = CircuitBreaker(threshold=2, cooldown=0.05, probe=probe)
    assert breaker.failure() is False
    breaker.success()
    assert breaker.failure() is False
    assert breaker.failure() is True
    assert not breaker.allow()
    time.sleep(0.2)
    assert not breaker.allow()
    assert len(probes) >= 2
    ok.set()
    deadline = time.monotonic() + 2
    while not breaker.allow() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert breaker.allow()
    assert breaker.opened == 1
