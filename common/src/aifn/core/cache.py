"""The prediction cache: per text, shared by every function, never a point of failure.

What is cached is a text's raw scores (one float per label, in the caller's label order) and its
truncation flag, under a key made of the function, the model's content hash (a new model never
serves old answers), every parameter that changes the scores, and the normalised text. Ranking,
renormalising and thresholds are applied after the cache, so they cost nothing to vary.

Two backends: an in-process LRU (the default) and Redis / Memorystore (``REDIS_URL`` or
``REDIS_HOST``), read with one ``MGET`` and written with one pipelined round trip per request.
Redis is optional in every sense: connect and command timeouts are short, a circuit breaker stops
calling it after consecutive failures and a background probe (never a request) notices when it is
back, unreadable values count as misses, and any error means "ask the model". Concurrent identical
misses inside an instance are computed once (single-flight).

Scope (``CACHE_SCOPE``): with ``caller`` (the default) every key also holds the caller's cache
scope, so a caller only ever hits entries its own identity wrote, and neither ``cached`` nor the
response time tells it what anyone else sent. The HTTP edge names the scope for the duration of
a request with :func:`caller_scope` (:class:`aifn.http.auth.Guard` decides who the caller is); work
outside a request (batch files, jobs) runs in :data:`BATCH_SCOPE`. ``shared`` drops the scope
from the key: one namespace for every caller, for single-tenant deployments.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
import threading
import time
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from aifn.core.errors import ConfigError
from aifn.core.model import Scores

if TYPE_CHECKING:
    from aifn.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "aifn:v1"
_FLAG_TRUNCATED = 1
_VERSION = 1

SCOPES = ("caller", "shared")
# The scope of cache work done outside any HTTP request: batch files (event, job or local).
# Whoever may write batch input files shares it; no HTTP caller ever does.
BATCH_SCOPE = "batch"
_scope: ContextVar[str] = ContextVar("aifn_cache_scope", default=BATCH_SCOPE)


@contextmanager
def caller_scope(scope: str) -> Iterator[None]:
    """Run the block's cache lookups and writes as ``scope`` (a caller's identity).

    Restored on exit, so a request thread that serves another caller next never keeps it.
    """
    token = _scope.set(scope)
    try:
        yield
    finally:
        _scope.reset(token)


def current_scope() -> str:
    """The scope cache keys are made in here: the caller's, else :data:`BATCH_SCOPE`."""
    return _scope.get()


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


class CorruptValue(ValueError):
    """A cached value that is not what this code writes."""


def encode(scores: Scores) -> bytes:
    """Version byte, flags byte, then little-endian float64s: 2 + 8 bytes per label."""
    flags = _FLAG_TRUNCATED if scores.truncated else 0
    return struct.pack(f"<BB{len(scores.values)}d", _VERSION, flags, *scores.values)


def decode(raw: bytes, width: int) -> Scores:
    """The inverse of :func:`encode`, checking everything a stray or damaged value could break.

    Raises:
        CorruptValue: Wrong version, length or flags, or a score that is not a finite number.
    """
    if len(raw) != 2 + 8 * width:
        raise CorruptValue(f"{len(raw)} bytes, expected {2 + 8 * width}")
    version, flags, *values = struct.unpack(f"<BB{width}d", raw)
    if version != _VERSION or flags & ~_FLAG_TRUNCATED:
        raise CorruptValue(f"version {version}, flags {flags}")
    if not all(math.isfinite(v) for v in values):
        raise CorruptValue("non-finite score")
    return Scores(tuple(values), bool(flags & _FLAG_TRUNCATED))


def normalise(text: str) -> str:
    """The text as the model reads it: NFC, whitespace runs collapsed, ends stripped.

    WordPiece tokenizers split on any whitespace run, so this never changes an answer.
    """
    return " ".join(unicodedata.normalize("NFC", text).split())


class Backend(Protocol):
    name: str

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    def set_many(self, items: dict[str, bytes], ttl: int) -> None: ...


class MemoryBackend:
    """A bounded in-process LRU with per-entry expiry; safe across threads."""

    name = "memory"

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry[0] <= now:
                    if entry is not None:
                        del self._entries[key]
                    out.append(None)
                else:
                    self._entries.move_to_end(key)
                    out.append(entry[1])
        return out

    def set_many(self, items: dict[str, bytes], ttl: int) -> None:
        expires = self._clock() + ttl
        with self._lock:
            for key, value in items.items():
                self._entries[key] = (expires, value)
                self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)


class RedisBackend:
    """Redis or Memorystore through redis-py: one MGET to read, one pipeline to write."""

    name = "redis"

    def __init__(self, client: Any) -> None:
        self.client = client

    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        values: list[bytes | None] = self.client.mget(list(keys))
        return values

    def set_many(self, items: dict[str, bytes], ttl: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in items.items():
            pipe.set(key, value, ex=ttl)
        pipe.execute()

    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self.client.close()


class CircuitBreaker:
    """Closed until ``threshold`` consecutive failures; then open until a probe succeeds.

    While open, requests skip the backend entirely. The probe runs in a background thread every
    ``cooldown`` seconds, so no request ever waits on a backend that is down. ``name`` says whose
    backend it is in logs and thread names.
    """

    def __init__(
        self,
        *,
        threshold: int,
        cooldown: float,
        probe: Callable[[], None] | None,
        name: str = "cache",
    ) -> None:
        self.name = name
        self._threshold = threshold
        self._cooldown = cooldown
        self._probe = probe
        self._failures = 0
        self._open = False
        self._lock = threading.Lock()
        self.opened = 0  # times the breaker has opened

    @property
    def state(self) -> str:
        return "open" if self._open else "closed"

    def allow(self) -> bool:
        return not self._open

    def success(self) -> None:
        with self._lock:
            self._failures = 0

    def failure(self) -> bool:
        """Record a failure; True when it opened the breaker."""
        with self._lock:
            self._failures += 1
            if self._open or self._failures < self._threshold:
                return False
            self._open = True
            self.opened += 1
        threading.Thread(
            target=self._probe_until_closed, name=f"{self.name}-probe", daemon=True
        ).start()
        return True

    def _probe_until_closed(self) -> None:
        while True:
            time.sleep(self._cooldown)
            try:
                if self._probe is not None:
                    self._probe()
            except Exception as exc:  # any failure means "still down"
                log.debug("%s backend still unavailable: %s", self.name, exc)
                continue
            with self._lock:
                self._open = False
                self._failures = 0
            log.warning("%s backend is reachable again; using it", self.name)
            return


class _Flight:
    """One request's computation of the keys it claimed; the scores it got, once it is over.

    One per request, not one per key: a request refused by a full queue (the common case under
    overload) then costs one lock, where a ``Future`` per text cost a ``Condition`` each.
    """

    __slots__ = ("_gate", "results")

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()  # held until the computation is over, whatever its outcome
        self.results: dict[str, Scores] = {}

    def finish(self, results: dict[str, Scores]) -> None:
        self.results = results
        self._gate.release()

    def wait(self, timeout: float) -> bool:
        """Whether the computation is over (within ``timeout`` seconds)."""
        if not self._gate.acquire(timeout=timeout):
            return False
        self._gate.release()  # open for every other waiter too
        return True


class _Flights:
    """In-flight computations by key, so concurrent identical misses compute once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, _Flight] = {}

    def claim(self, keys: Sequence[str]) -> tuple[list[str], _Flight, dict[str, _Flight]]:
        """(keys this caller must compute, its flight, flights of keys others are computing)."""
        mine: list[str] = []
        theirs: dict[str, _Flight] = {}
        flight = _Flight()
        with self._lock:
            for key in keys:
                running = self._running.get(key)
                if running is None:
                    self._running[key] = flight
                    mine.append(key)
                else:
                    theirs[key] = running
        return mine, flight, theirs

    def settle(self, keys: Sequence[str], flight: _Flight, results: dict[str, Scores]) -> None:
        """End ``flight``: its keys leave the table and its waiters read ``results`` (a key
        missing from them, after an error, is computed by each waiter itself)."""
        with self._lock:
            for key in keys:
                del self._running[key]
        flight.finish(results)


@dataclass
class CacheStats:
    """Counters since start, per text (a batch of 8 with 3 cached is 3 hits and 5 misses)."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # misses answered by another request's computation
    errors: dict[str, int] = field(default_factory=dict)  # by kind

    def to_json(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "errors": dict(self.errors),
        }


class PredictionCache:
    """Per-text scores for one function and model, in front of any backend (or none).

    Args:
        backend: Where values live; ``None`` disables caching (single-flight still applies).
        namespace: The function and model revision, e.g. ``"sentiment:sha256:d913..."``.
        ttl: Seconds a value lives.
        breaker: Guards a remote backend; ``None`` for the in-process one.
        warn_interval: Least seconds between two warnings about backend errors.
        scope: ``"caller"``: keys hold :func:`current_scope`, so callers never share entries;
            ``"shared"``: one namespace for every caller.
    """

    def __init__(
        self,
        backend: Backend | None,
        *,
        namespace: str,
        ttl: int,
        breaker: CircuitBreaker | None = None,
        warn_interval: float = 60.0,
        wait_timeout: float = 60.0,
        scope: str = "caller",
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        self.backend = backend
        self.scope = scope
        self._namespace = namespace
        self._ttl = ttl
        self.breaker = breaker
        self._warn_interval = warn_interval
        self._wait_timeout = wait_timeout
        self._last_warning = -math.inf
        self._suppressed = 0
        self._flights = _Flights()
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def describe(self) -> dict[str, Any]:
        """Backend, breaker state and counters, for health and (later) metrics."""
        with self._lock:
            counters = self.stats.to_json()
        return {
            "backend": self.backend.name if self.backend is not None else "off",
            "state": self.breaker.state if self.breaker else "closed",
            "scope": self.scope,
            **counters,
        }

    def key(self, text: str, params: Any) -> str:
        """The key of ``text`` under ``params`` for the current caller (see :func:`caller_scope`).

        Per caller: ``aifn:v1:<function>:<scope hash>:<hash>``, so one caller's entries can be
        found (and deleted) by prefix without storing who the caller is; shared:
        ``aifn:v1:<function>:<hash>``.
        """
        return self.keys([text], params)[0]

    def keys(self, texts: Sequence[str], params: Any) -> list[str]:
        """:meth:`key` of each text; what the texts share (params, scope) is encoded once."""
        function = self._namespace.split(":", 1)[0]
        head = hashlib.sha256()
        for part in (
            self._namespace,
            json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
        ):
            head.update(_utf8(part) + b"\0")
        prefix = f"{KEY_PREFIX}:{function}"
        tail = b""
        if self.scope == "caller":
            scope = current_scope()
            tail = _utf8(scope) + b"\0"
            prefix += ":" + hashlib.sha256(_utf8(scope)).hexdigest()[:16]
        out = []
        for text in texts:
            digest = head.copy()
            digest.update(_utf8(normalise(text)) + b"\0" + tail)
            out.append(f"{prefix}:{digest.hexdigest()[:32]}")
        return out

    def get_or_compute(
        self,
        texts: Sequence[str],
        *,
        params: Any,
        width: int,
        compute: Callable[[list[str]], list[Scores]],
    ) -> list[tuple[Scores, bool]]:
        """Each text's scores and whether they came from the cache, in input order.

        Args:
            params: Everything besides the text that changes the scores (JSON-able).
            width: How many scores each text has (checks what the cache returns).
            compute: Scores for a list of texts, in order; called once, with the misses only.
        """
        keys = self.keys(texts, params)
        first_text = dict(zip(reversed(keys), reversed(texts), strict=True))
        unique = list(dict.fromkeys(keys))
        found = self._read(unique, width)
        missing = [k for k in unique if k not in found]

        computed: dict[str, Scores] = {}
        mine, flight, theirs = self._flights.claim(missing)
        if mine:
            try:
                fresh = compute([first_text[k] for k in mine])
                computed.update(zip(mine, fresh, strict=True))
            finally:
                self._flights.settle(mine, flight, dict(computed))
            self._write({k: encode(computed[k]) for k in mine})
        coalesced = 0
        deadline = time.monotonic() + self._wait_timeout
        for key, other in theirs.items():
            done = other.wait(max(0.0, deadline - time.monotonic()))
            if done and key in other.results:
                computed[key] = other.results[key]
                coalesced += 1
            else:  # the other request failed or stalled: compute it ourselves
                computed[key] = compute([first_text[key]])[0]

        hits = sum(k in found for k in keys)
        with self._lock:
            self.stats.hits += hits
            self.stats.misses += len(keys) - hits
            self.stats.coalesced += coalesced
        return [(found[k], True) if k in found else (computed[k], False) for k in keys]

    def _read(self, keys: list[str], width: int) -> dict[str, Scores]:
        if not keys or not self._usable():
            return {}
        assert self.backend is not None
        try:
            raw = self.backend.get_many(keys)
        except Exception as exc:
            self._failed("read", exc)
            return {}
        self._succeeded()
        found: dict[str, Scores] = {}
        for key, value in zip(keys, raw, strict=True):
            if value is None:
                continue
            try:
                found[key] = decode(value, width)
            except (CorruptValue, struct.error, TypeError) as exc:
                self._count("corrupt")
                self._warn(f"unreadable cache value under {key} (treated as a miss): {exc}")
        return found

    def _write(self, items: dict[str, bytes]) -> None:
        if not items or not self._usable():
            return
        assert self.backend is not None
        try:
            self.backend.set_many(items, self._ttl)
        except Exception as exc:
            self._failed("write", exc)
        else:
            self._succeeded()

    def _usable(self) -> bool:
        if self.backend is None:
            return False
        if self.breaker is not None and not self.breaker.allow():
            self._count("skipped")
            return False
        return True

    def _succeeded(self) -> None:
        if self.breaker is not None:
            self.breaker.success()

    def _failed(self, operation: str, exc: Exception) -> None:
        self._count(operation)
        opened = self.breaker.failure() if self.breaker is not None else False
        if opened:
            log.warning(
                "cache backend failing (%s: %s); answering from the model without it until a "
                "background probe succeeds",
                operation,
                exc,
            )
        else:
            self._warn(f"cache {operation} failed, answered from the model: {exc}")

    def _count(self, kind: str) -> None:
        with self._lock:
            self.stats.errors[kind] = self.stats.errors.get(kind, 0) + 1

    def _warn(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_warning < self._warn_interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._last_warning = now
        extra = f" ({suppressed} similar warnings suppressed)" if suppressed else ""
        log.warning("%s%s", message, extra)


def from_settings(settings: Settings, *, function: str, revision: str) -> PredictionCache:
    """Redis when ``REDIS_URL`` or ``REDIS_HOST`` is set, else in process (or off at size 0).

    Nothing here touches the network: redis-py connects on first use, so start-up never waits
    for Redis (on Cloud Run, Direct VPC egress can take a while to come up).
    """
    namespace = f"{function}:{revision}"
    ttl = settings.cache_ttl_seconds
    if settings.redis_url or settings.redis_host:
        backend = RedisBackend(redis_client(settings))
        breaker = CircuitBreaker(
            threshold=3, cooldown=settings.redis_probe_seconds, probe=backend.ping
        )
        return PredictionCache(
            backend, namespace=namespace, ttl=ttl, breaker=breaker, scope=settings.cache_scope
        )
    if settings.cache_max_entries == 0:
        return PredictionCache(None, namespace=namespace, ttl=ttl, scope=settings.cache_scope)
    return PredictionCache(
        MemoryBackend(settings.cache_max_entries),
        namespace=namespace,
        ttl=ttl,
        scope=settings.cache_scope,
    )


def redis_client(settings: Settings) -> Any:
    """A redis-py client with short timeouts and no retries (the breaker decides, not retries).

    Raises:
        ConfigError: ``REDIS_CA_CERT`` is not a readable file and holds no certificate.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    timeout = settings.redis_timeout_ms / 1000
    options: dict[str, Any] = {
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.redis_url:
        if settings.redis_auth:
            options["password"] = settings.redis_auth
        if settings.redis_ca_cert and settings.redis_url.startswith("rediss://"):
            options.update(_ca_options(settings.redis_ca_cert))
        return redis.Redis.from_url(settings.redis_url, **options)
    if settings.redis_ca_cert:
        options.update(
            ssl=True,
            ssl_cert_reqs="required",
            ssl_check_hostname=False,
            **_ca_options(settings.redis_ca_cert),
        )
    assert settings.redis_host is not None
    return redis.Redis(
        host=settings.redis_host, port=settings.redis_port, password=settings.redis_auth, **options
    )


_PEM_CERT = re.compile(
    r"-----BEGIN CERTIFICATE-----(?P<body>[A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----"
)


def ca_bundle(value: str) -> list[str]:
    """Every certificate in ``REDIS_CA_CERT`` (PEM text or a file), each as clean PEM.

    Memorystore lists more than one server CA while it rotates them, and a server certificate
    may chain to any of them, so every one is trusted. The certificates may come concatenated
    with or without line breaks between them, with CRLF line ends, or with the ``\\n`` escapes
    of a one-line environment variable; each is rewrapped as OpenSSL expects.

    Raises:
        ConfigError: A path that is not a readable file, or text without a certificate.
    """
    text = value
    if "-----BEGIN" not in value:
        try:
            text = Path(value.strip()).read_text(encoding="ascii", errors="replace")
        except (OSError, ValueError):
            raise ConfigError(
                f"REDIS_CA_CERT: {value} is neither PEM text nor a readable file"
            ) from None
    text = text.replace("\\n", "\n")
    bundle = []
    for match in _PEM_CERT.finditer(text):
        body = "".join(match.group("body").split())
        if not body:
            continue
        lines = [body[i : i + 64] for i in range(0, len(body), 64)]
        bundle.append(
            "\n".join(["-----BEGIN CERTIFICATE-----", *lines, "-----END CERTIFICATE-----"])
        )
    if not bundle:
        raise ConfigError("REDIS_CA_CERT holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return bundle


def _ca_options(value: str) -> dict[str, str]:
    return {"ssl_ca_data": "\n".join(ca_bundle(value)) + "\n"}
