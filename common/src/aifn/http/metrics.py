"""Prometheus metrics for one function, served at ``GET /metrics`` in the text format.

Each :class:`Metrics` has its own ``CollectorRegistry`` (never prometheus-client's global one), so
two services or several tests in one process do not clash. Values live in the process that
serves requests: functions-framework imports the function in gunicorn's master and forks one
worker (``WORKERS=1``); nothing is counted before the fork, and the worker counts from zero.
More than one worker process would need prometheus-client's multiprocess mode.

Label values are bounded: ``route`` is a registered path or ``unmatched``, ``method`` one of the
HTTP methods or ``other``, ``reason`` an error ``type`` from :mod:`aifn.core.errors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from aifn.core.cache import PredictionCache
    from aifn.core.model import ModelIdentity

CONTENT_TYPE = CONTENT_TYPE_LATEST
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds: a cached answer takes a few ms, a full batch under load up to REQUEST_TIMEOUT_SECONDS.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The registry and the instruments the service and the batcher record into.

    Args:
        function: The capability's name; it appears in ``aifn_model_info``.
    """

    def __init__(self, function: str) -> None:
        self.function = function
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aifn_http_requests",
            "HTTP requests answered, by route (registered path or 'unmatched'), method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "aifn_http_request_duration_seconds",
            "Time spent answering a request in the function, by route (as Server-Timing).",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejections = Counter(
            "aifn_rejections",
            "Requests answered with an error, by the error's type (the error table: docs/api.md).",
            ["reason"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "aifn_batch_size_texts",
            "Texts in each batch the model ran (one call from the batching queue).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.inference = Histogram(
            "aifn_inference_seconds",
            "Time the model took for each batch.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model = Info("aifn_model", "The model this function serves.", registry=self.registry)
        ProcessCollector(registry=self.registry)

    def watch(
        self,
        *,
        identity: ModelIdentity,
        kind: str,
        queued: Callable[[], int],
        cache: PredictionCache,
    ) -> None:
        """Add what is read at scrape time: model identity, queue depth, cache counters."""
        self.model.info(
            {
                "function": self.function,
                "name": identity.name,
                "revision": identity.revision,
                "kind": kind,
            }
        )
        Gauge(
            "aifn_queue_texts",
            "Texts waiting for a model worker right now.",
            registry=self.registry,
        ).set_function(queued)
        self.registry.register(_CacheCollector(cache))

    def observe_request(
        self, *, route: str, method: str, status: int, seconds: float, error_type: str | None
    ) -> None:
        """Count one answered request (``route`` is a registered path or :data:`UNMATCHED`)."""
        shown = method if method in _METHODS else "other"
        self.requests.labels(route, shown, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if error_type is not None:
            self.rejections.labels(error_type).inc()

    def observe_batch(self, texts: int, seconds: float) -> None:
        """Record one run of the model: how many texts, how long it took."""
        self.batch_size.observe(texts)
        self.inference.observe(seconds)

    def render(self) -> bytes:
        """Everything, in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _CacheCollector:
    """The prediction cache's own counters, read at scrape time (they are counted once, there)."""

    def __init__(self, cache: PredictionCache) -> None:
        self._cache = cache

    def describe(self) -> Iterable[Metric]:
        return _cache_families({"hits": 0, "misses": 0, "coalesced": 0, "errors": {}})

    def collect(self) -> Iterable[Metric]:
        return _cache_families(self._cache.describe())


def _cache_families(state: dict[str, Any]) -> list[Metric]:
    """Metric families from :meth:`PredictionCache.describe`'s dict."""
    families: list[Metric] = [
        CounterMetricFamily(f"aifn_cache_{key}", doc, value=state[key])
        for key, doc in (
            ("hits", "Texts answered from the prediction cache."),
            ("misses", "Texts the prediction cache did not have."),
            ("coalesced", "Misses answered by a concurrent request's computation of the text."),
        )
    ]
    errors = CounterMetricFamily(
        "aifn_cache_errors",
        "Cache backend failures by kind: read, write, corrupt (an unreadable value), skipped "
        "(not tried while the circuit is open).",
        labels=["kind"],
    )
    for kind, count in sorted(state["errors"].items()):
        errors.add_metric([kind], count)
    families.append(errors)
    families.append(
        GaugeMetricFamily(
            "aifn_cache_circuit_open",
            "1 while the cache backend is considered down and skipped, else 0.",
            value=1.0 if state.get("state") == "open" else 0.0,
        )
    )
    return families
