"""Per-client rate limits: a token bucket per client, shared by every instance through Redis.

Each client (:mod:`aifn.http.auth` decides who counts as one) has a bucket of ``Rate.requests``
tokens, refilled continuously at ``requests / period``. A request costs one token per unit of
work (a text, and on zero-shot classify a label prompt not in the label cache: see
:meth:`aifn.http.service.Service.work_units`) and is refused unless its client holds them. A client
may spend its whole budget at once, then goes on at the steady rate.

A request's cost is known only once its body is read, so it is charged in two steps: one token
before the body is read (:meth:`RateLimiter.check`: a client with nothing left is refused
without costing a body read), then the rest once it is parsed (:meth:`RateLimiter.charge`). A
request refused at the second step keeps its first token spent (its body was read), and its
``Retry-After`` is the time until the whole request would pass. A request costing more than
the whole bucket would otherwise never pass: it is admitted on a full bucket and leaves it in
debt (negative), so over time a client never gets more than the rate.

With Redis configured (the prediction cache's ``REDIS_*`` settings and client), every instance
draws on the same bucket: one Lua script per request (EVALSHA through redis-py's ``Script``,
which loads it again after a ``NOSCRIPT``), atomic, and timed by the Redis server's clock so the
instances' clocks do not matter. Keys are ``aifn:rl:v1:<function>:<hash>``: identities are
hashed, so key ids, e-mails and addresses are not stored in clear. A key expires once its bucket
would be full again, so idle clients cost Redis nothing.

Redis never fails a request: an error or a timeout (``REDIS_TIMEOUT_MS``) means the decision is
made by a bucket in this process (the budget is then per instance), and after 3 failures in a
row the cache's circuit breaker stops calling Redis until a background probe finds it back.

Responses carry the fields of draft-ietf-httpapi-ratelimit-headers-06 (December 2022):
``RateLimit-Limit``, ``RateLimit-Remaining``, ``RateLimit-Reset`` (seconds until the bucket is
full again) and ``RateLimit-Policy`` (``<requests>;w=<period seconds>``), plus ``Retry-After``
(whole seconds until the next token) on a 429.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aifn.settings import Rate

if TYPE_CHECKING:
    from aifn.core.cache import CircuitBreaker
    from aifn.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "aifn:rl:v1"
# In-process buckets kept at most; the least recently used go first. An evicted client starts
# again with a full bucket, so the bound can only make the limit more lenient, never stricter.
MAX_MEMORY_BUCKETS = 10_000


@dataclass(frozen=True)
class Decision:
    """One request's verdict and what its response tells the client."""

    allowed: bool
    rate: Rate
    remaining: int  # whole tokens left after this request
    reset: int  # seconds until the bucket is full again
    retry_after: int  # seconds until the request would pass; 0 when allowed
    backend: str  # "redis" or "memory": who decided

    @classmethod
    def of(
        cls, rate: Rate, allowed: bool, tokens: float, backend: str, *, wait_for: float = 1
    ) -> Decision:
        """The verdict, ``tokens`` left (negative: in debt); a refusal waits for ``wait_for``."""
        tokens = round(min(float(rate.requests), tokens), 6)
        wait = 0 if allowed else max(1, math.ceil((wait_for - tokens) / rate.per_second))
        return cls(
            allowed=allowed,
            rate=rate,
            remaining=math.floor(max(0.0, tokens)),
            reset=math.ceil((rate.requests - tokens) / rate.per_second),
            retry_after=wait,
            backend=backend,
        )

    def headers(self) -> dict[str, str]:
        out = {
            "RateLimit-Limit": str(self.rate.requests),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
            "RateLimit-Policy": f"{self.rate.requests};w={self.rate.period:g}",
        }
        if not self.allowed:
            out["Retry-After"] = str(self.retry_after)
        return out


class MemoryBuckets:
    """Token buckets in this process: thread-safe, at most ``max_clients``, idle ones dropped."""

    name = "memory"

    def __init__(
        self,
        rate: Rate,
        *,
        max_clients: int = MAX_MEMORY_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate = rate
        self._max = max_clients
        self._clock = clock
        # key -> (tokens, last update); ordered by last use, oldest first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, cost: int = 1, need: float = 1) -> tuple[bool, float]:
        """Take ``cost`` tokens from ``key``'s bucket if it holds ``need``: (allowed, left)."""
        rate = self._rate
        now = self._clock()
        with self._lock:
            entry = self._buckets.pop(key, None)
            tokens = float(rate.requests)
            if entry is not None:
                tokens = min(tokens, entry[0] + max(0.0, now - entry[1]) * rate.per_second)
            allowed = tokens >= need
            if allowed:
                tokens -= cost
            self._buckets[key] = (tokens, now)
            self._evict(now)
        return allowed, tokens

    def _evict(self, now: float) -> None:
        # A bucket full again is the same as no bucket at all (one in debt takes longer).
        rate = self._rate
        while self._buckets:
            _, (tokens, updated) = next(iter(self._buckets.items()))
            full_at = updated + (rate.requests - tokens) / rate.per_second
            if len(self._buckets) <= self._max and now < full_at:
                return
            self._buckets.popitem(last=False)


# KEYS[1]: the bucket. ARGV: capacity, tokens per second, cost, the tokens the bucket must hold
# for the cost to be taken (the cost, or less for a request bigger than the bucket). Returns
# {allowed, tokens left} with the tokens as a string (Redis truncates Lua numbers to integers).
# TIME is the server's clock, so every instance measures refills the same way (writing after
# TIME needs Redis 5+, where scripts replicate their effects; Memorystore runs 7.x).
_TAKE = """
local capacity = tonumber(ARGV[1])
local per_second = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local need = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = capacity
else
  tokens = math.min(capacity, tokens + math.max(0, now - at) * per_second)
end
local allowed = 0
if tokens >= need then
  tokens = tokens - cost
  allowed = 1
end
local left = string.format('%.6f', tokens)
redis.call('HSET', KEYS[1], 'tokens', left, 'at', string.format('%.6f', now))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / per_second * 1000) + 1000)
return {allowed, left}
"""


class RedisBuckets:
    """Token buckets in Redis, one atomic script call per request."""

    name = "redis"

    def __init__(self, client: Any, rate: Rate) -> None:
        self.client = client
        self._rate = rate
        self._script = client.register_script(_TAKE)

    def take(self, key: str, cost: int = 1, need: float = 1) -> tuple[bool, float]:
        allowed, tokens = self._script(
            keys=[key], args=[self._rate.requests, repr(self._rate.per_second), cost, repr(need)]
        )
        return int(allowed) == 1, float(tokens)

    def ping(self) -> None:
        self.client.ping()


class RateLimiter:
    """Decides per client identity, in Redis when it answers, else in this process.

    Args:
        rate: The budget of every client.
        function: Part of every key, so each function has its own budgets.
        redis: Shared buckets, or ``None`` for in-process only.
        breaker: Guards ``redis`` (the cache's :class:`~aifn.core.cache.CircuitBreaker`).
        memory: The fallback (and, without Redis, the only) buckets.
        warn_interval: Least seconds between two warnings about Redis errors.
    """

    def __init__(
        self,
        rate: Rate,
        *,
        function: str,
        redis: RedisBuckets | None = None,
        breaker: CircuitBreaker | None = None,
        memory: MemoryBuckets | None = None,
        warn_interval: float = 60.0,
    ) -> None:
        self.rate = rate
        self._function = function
        self._redis = redis
        self.breaker = breaker
        self._memory = memory if memory is not None else MemoryBuckets(rate)
        self._warn_interval = warn_interval
        self._last_warning = -math.inf
        self._lock = threading.Lock()
        self.counts = {"allowed": 0, "limited": 0, "units": 0, "fallback": 0}

    def key(self, identity: str) -> str:
        digest = hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()[:32]
        return f"{KEY_PREFIX}:{self._function}:{digest}"

    def check(self, identity: str) -> Decision:
        """Take one token from ``identity``'s bucket (a request's first unit, before its body).

        Never raises for a Redis failure.
        """
        decision = self._take(identity, 1, 1, 1)
        with self._lock:
            self.counts["allowed" if decision.allowed else "limited"] += 1
        return decision

    def charge(self, identity: str, units: int) -> Decision:
        """Take the rest of a request of ``units`` whose first unit :meth:`check` took.

        Passes when the bucket holds the rest, or (a request bigger than the whole budget)
        is full again; a refusal takes nothing more, and its ``Retry-After`` is the time until
        the whole request would pass. Never raises for a Redis failure.
        """
        rest = max(0, units - 1)
        need = min(units, self.rate.requests)
        decision = self._take(identity, rest, need - 1, need)
        if not decision.allowed:
            with self._lock:  # the request counted as allowed by check() is refused after all
                self.counts["allowed"] -= 1
                self.counts["limited"] += 1
        return decision

    def _take(self, identity: str, cost: int, need: float, wait_for: float) -> Decision:
        key = self.key(identity)
        decision: Decision | None = None
        if self._redis is not None and (self.breaker is None or self.breaker.allow()):
            try:
                allowed, tokens = self._redis.take(key, cost, need)
            except Exception as exc:  # any Redis failure: decide here instead
                self._failed(exc)
            else:
                if self.breaker is not None:
                    self.breaker.success()
                decision = Decision.of(self.rate, allowed, tokens, "redis", wait_for=wait_for)
        if decision is None:
            allowed, tokens = self._memory.take(key, cost, need)
            decision = Decision.of(self.rate, allowed, tokens, "memory", wait_for=wait_for)
        with self._lock:
            if decision.allowed:
                self.counts["units"] += cost
            if self._redis is not None and decision.backend == "memory":
                self.counts["fallback"] += 1
        return decision

    def describe(self) -> dict[str, Any]:
        """The limit, where buckets live, breaker state and counters, for health."""
        with self._lock:
            counts = dict(self.counts)
        return {
            "limit": str(self.rate),
            "backend": "memory" if self._redis is None else "redis",
            "state": self.breaker.state if self.breaker is not None else "closed",
            **counts,
        }

    def _failed(self, exc: Exception) -> None:
        opened = self.breaker.failure() if self.breaker is not None else False
        now = time.monotonic()
        with self._lock:
            if not opened and now - self._last_warning < self._warn_interval:
                return
            self._last_warning = now
        log.warning(
            "rate limiter: Redis failed (%s); deciding in this process%s",
            exc,
            " until a background probe finds Redis back" if opened else "",
        )


def from_settings(settings: Settings, *, function: str) -> RateLimiter | None:
    """``None`` when ``RATE_LIMIT`` is unset; Redis buckets when the cache has Redis.

    Nothing here touches the network (redis-py connects on first use).

    Raises:
        ConfigError: ``REDIS_CA_CERT`` names a file that does not exist.
    """
    rate: Rate | None = settings.rate_limit
    if rate is None:
        return None
    if not (settings.redis_url or settings.redis_host):
        return RateLimiter(rate, function=function)
    from aifn.core.cache import CircuitBreaker, redis_client

    redis = RedisBuckets(redis_client(settings), rate)
    breaker = CircuitBreaker(
        threshold=3, cooldown=settings.redis_probe_seconds, probe=redis.ping, name="rate-limit"
    )
    return RateLimiter(rate, function=function, redis=redis, breaker=breaker)
