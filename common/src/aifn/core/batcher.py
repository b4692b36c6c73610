"""Dynamic batching: concurrent requests' texts share model worker calls, with backpressure.

Worker threads own the model (one per vCPU by default, each computing on its own core).
Requests hand their texts to the queue and wait; a free worker takes what is queued (up to
``max_batch`` texts, waiting at most ``max_wait`` seconds after the oldest text arrived for more
to come), runs them in one call of the model, and hands each request its own results, in its own
order. A request's list is split into one share per worker (at most ``max_batch`` each), so
idle workers run it together; short ones are merged. (The served
models run each text of a call alone, :mod:`aifn.core.model`: merging saves hand-offs between
threads, never changes a text's scores.)

Backpressure is explicit: at most ``max_queued`` texts wait at a time, and a request that would
exceed that is refused at once (:class:`Overloaded`, 429 with ``Retry-After``) rather than queued
behind work it cannot overtake. A request that waits longer than its deadline gets
:class:`DeadlineExceeded` (503) and its texts are dropped if the worker has not started them.

If a merged batch fails, each request in it is retried alone, so one bad input fails only its
own request.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Generic, NoReturn, TypeVar

from aifn.core.errors import DeadlineExceeded, Overloaded

log = logging.getLogger(__name__)
R = TypeVar("R")


@dataclass
class _Job(Generic[R]):
    texts: list[str]
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[list[R]] = field(default_factory=Future)


@dataclass
class BatchStats:
    """Counters since start: batches run, texts in them, and requests refused or timed out."""

    batches: int = 0
    texts: int = 0
    largest: int = 0
    refused: int = 0
    timed_out: int = 0
    isolated_retries: int = 0


class DynamicBatcher(Generic[R]):
    """Gather texts from concurrent callers into batches for ``run`` (one result per text).

    Args:
        run: The model call: texts in, one result per text out, in order.
        max_batch: Most texts in one call of ``run``.
        max_wait: Seconds the worker may wait after the oldest queued text for more texts.
        max_queued: Most texts waiting (not yet running); more are refused with 429.
        timeout: Seconds a request may wait for its results in total.
        retry_after: Seconds to suggest in ``Retry-After`` when refusing.
        workers: Threads taking batches from the queue, so up to this many batches run at once.
        on_batch: Called after each run of the model with its number of texts and seconds
            (for metrics); failed runs and the retries of a failed batch included.
    """

    def __init__(
        self,
        run: Callable[[list[str]], list[R]],
        *,
        max_batch: int,
        max_wait: float,
        max_queued: int,
        timeout: float,
        retry_after: int = 1,
        name: str = "model",
        workers: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._run = run
        self.workers = workers
        self._on_batch = on_batch
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queued = max_queued
        self.timeout = timeout
        self.retry_after = retry_after
        self._name = name
        self.stats = BatchStats()
        self._reset()
        # gunicorn loads the app in its master and forks workers; threads do not survive a fork,
        # so each process starts its own workers on first use, with fresh locks and queue.
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._queue: deque[_Job[R]] = deque()
        self._queued_texts = 0
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []

    def _ensure_workers(self) -> None:
        # Called with self._cond held.
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self.workers:
            thread = threading.Thread(
                target=self._loop,
                name=f"{self._name}-batcher-{len(self._threads)}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    @property
    def queued(self) -> int:
        """Texts waiting for the worker right now."""
        return self._queued_texts

    def __call__(self, texts: Sequence[str]) -> list[R]:
        """Results for ``texts``, in order, computed in shared batches.

        Raises:
            Overloaded: The queue is full; nothing was queued.
            DeadlineExceeded: The results did not come within ``timeout`` seconds.
        """
        if not texts:
            return []
        # Every lock here is held for as few bytecodes as possible: a thread the interpreter
        # switches out while holding one (every 5 ms under load) stalls every request behind it.
        if self._full(len(texts)):  # an early answer without the lock; re-checked under it
            self._refuse(self._queued_texts)
        deadline = time.monotonic() + self.timeout
        # A request's texts are shared out among the workers (8 texts on 2 workers: 4 each), so
        # an idle instance answers a list in the time of its share, not of the whole list.
        size = min(self.max_batch, -(-len(texts) // self.workers))
        jobs: list[_Job[R]] = [
            _Job(list(texts[i : i + size]), deadline) for i in range(0, len(texts), size)
        ]
        with self._cond:
            self._ensure_workers()
            queued = self._queued_texts
            refused = self._full(len(texts))
            if not refused:
                self._queue.extend(jobs)
                self._queued_texts += len(texts)
                self._cond.notify(len(jobs))  # a worker per share
        if refused:
            self._refuse(queued)
        results: list[R] = []
        for job in jobs:
            try:
                results.extend(job.future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                job.future.cancel()  # the worker skips it if it has not started it
                with self._cond:
                    self.stats.timed_out += 1
                raise DeadlineExceeded(
                    f"no result within {self.timeout:g} s (REQUEST_TIMEOUT_SECONDS); the instance "
                    "is overloaded, retry later",
                    retry_after=self.retry_after,
                ) from None
        return results

    def _full(self, texts: int) -> bool:
        # An empty queue always takes a request, so a large request is never refused forever.
        return bool(self._queued_texts) and self._queued_texts + texts > self.max_queued

    def _refuse(self, queued: int) -> NoReturn:
        with self._cond:
            self.stats.refused += 1
        raise Overloaded(
            f"the instance is at capacity ({queued} texts queued); retry in {self.retry_after} s",
            retry_after=self.retry_after,
        )

    def _take(self) -> list[_Job[R]]:
        """Block until there is work, gather a batch, and remove it from the queue."""
        with self._cond:
            while not self._queue:
                self._cond.wait()
            oldest = self._queue[0].enqueued
            while sum(len(j.texts) for j in self._queue) < self.max_batch:
                remaining = oldest + self.max_wait - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            # A worker's share of what is queued, so the other workers get the rest at once.
            share = min(self.max_batch, -(-self._queued_texts // self.workers))
            batch: list[_Job[R]] = []
            size = 0
            while self._queue and (not batch or size + len(self._queue[0].texts) <= share):
                job = self._queue.popleft()
                batch.append(job)
                size += len(job.texts)
            self._queued_texts -= size
            return batch

    def _loop(self) -> None:
        while True:
            batch = [job for job in self._take() if job.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            texts = [t for job in batch for t in job.texts]
            try:
                outputs = self._timed_run(texts)
                if len(outputs) != len(texts):
                    raise RuntimeError(f"{len(outputs)} results for {len(texts)} texts")
            except Exception as exc:
                self._isolate(batch, exc)
                continue
            with self._cond:
                self.stats.batches += 1
                self.stats.texts += len(texts)
                self.stats.largest = max(self.stats.largest, len(texts))
            start = 0
            for job in batch:
                job.future.set_result(outputs[start : start + len(job.texts)])
                start += len(job.texts)

    def _timed_run(self, texts: list[str]) -> list[R]:
        started = time.perf_counter()
        try:
            return self._run(texts)
        finally:
            if self._on_batch is not None:
                self._on_batch(len(texts), time.perf_counter() - started)

    def _isolate(self, batch: list[_Job[R]], exc: Exception) -> None:
        """A failed batch: run each request's texts alone, so only a bad one fails."""
        if len(batch) == 1:
            batch[0].future.set_exception(exc)
            return
        log.warning("a batch of %d requests failed (%s); retrying each alone", len(batch), exc)
        with self._cond:
            self.stats.isolated_retries += 1
        for job in batch:
            try:
                job.future.set_result(self._timed_run(job.texts))
            except Exception as alone:
                job.future.set_exception(alone)
