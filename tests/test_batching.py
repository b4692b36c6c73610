"""Dynamic batching: order, merging, splitting, error isolation, backpressure, deadlines.

The batcher is exercised with a stand-in for the model that records every batch it is given,
so the tests can see exactly which texts shared a forward pass. A gate lets a test hold the
worker busy while requests queue behind it, which is how merging happens under load.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from aifn.core.batcher import DynamicBatcher
from aifn.core.errors import DeadlineExceeded, Overloaded
from aifn.http.errors import headers, status

from .helpers import Recorder, hold


def batcher(model: Recorder, **overrides: float) -> DynamicBatcher[str]:
    options = {"max_batch": 8, "max_wait": 0.0, "max_queued": 64, "timeout": 10.0}
    options.update(overrides)
    return DynamicBatcher(model, **options)  # type: ignore[arg-type]


def test_results_come_back_to_the_right_request_in_order() -> None:
    model = Recorder()
    b = batcher(model)
    holder = hold(model, b)
    requests = [
        [f"r{r}-t{i}-" + "x" * ((r * 7 + i) % 5) for i in range(r % 3 + 1)] for r in range(12)
    ]
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(b, texts) for texts in requests]
        time.sleep(0.2)  # all twelve are queued behind the holder
        model.gate.set()
        results = [f.result(10) for f in futures]
    holder.join(5)
    for texts, result in zip(requests, results, strict=True):
        assert result == [t.upper() for t in texts]
    # Queued requests were merged: fewer batches than requests, none over the limit.
    merged = model.batches[1:]
    assert len(merged) < len(requests)
    assert max(len(batch) for batch in merged) <= 8
    assert sorted(t for batch in merged for t in batch) == sorted(t for r in requests for t in r)


def test_a_list_larger_than_the_batch_is_split() -> None:
    model = Recorder()
    b = batcher(model, max_batch=4)
    texts = [f"t{i}" for i in range(10)]
    assert b(texts) == [t.upper() for t in texts]
    assert [len(batch) for batch in model.batches] == [4, 4, 2]


def test_max_wait_lets_a_lone_request_gather_company() -> None:
    model = Recorder()
    b = batcher(model, max_wait=0.3)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(b, ["a"])
        time.sleep(0.05)
        second = pool.submit(b, ["b"])
        assert (first.result(5), second.result(5)) == (["A"], ["B"])
    assert model.batches == [["a", "b"]]


def test_a_failing_input_fails_only_its_own_request() -> None:
    model = Recorder()
    b = batcher(model)
    holder = hold(model, b)
    with ThreadPoolExecutor(3) as pool:
        good = pool.submit(b, ["fine", "also fine"])
        bad = pool.submit(b, ["poison pill"])
        other = pool.submit(b, ["more"])
        time.sleep(0.2)
        model.gate.set()
        assert good.result(10) == ["FINE", "ALSO FINE"]
        assert other.result(10) == ["MORE"]
        with pytest.raises(ValueError, match="poison"):
            bad.result(10)
    holder.join(5)
    assert b.stats.isolated_retries == 1
    assert ["fine", "also fine", "poison pill", "more"] in model.batches  # they did share a batch


def test_a_full_queue_refuses_at_once_with_retry_after() -> None:
    model = Recorder()
    b = batcher(model, max_queued=5, retry_after=2)
    holder = hold(model, b)
    with ThreadPoolExecutor(2) as pool:
        queued = pool.submit(b, ["a", "b", "c", "d"])
        time.sleep(0.1)
        assert b.queued == 4
        with pytest.raises(Overloaded) as refused:
            b(["e", "f"])  # 4 + 2 > 5: refused while the worker is still busy, not after
        assert status(refused.value) == 429
        assert headers(refused.value) == {"Retry-After": "2"}
        assert b.stats.refused == 1
        model.gate.set()
        assert queued.result(10) == ["A", "B", "C", "D"]
    holder.join(5)
    assert ["e", "f"] not in model.batches


def test_an_empty_queue_takes_even_a_request_larger_than_the_limit() -> None:
    model = Recorder()
    b = batcher(model, max_queued=3, max_batch=2)
    assert b(["a", "b", "c", "d", "e"]) == ["A", "B", "C", "D", "E"]


def test_a_request_past_its_deadline_gets_503_and_is_not_run() -> None:
    model = Recorder()
    b = batcher(model, timeout=0.3)
    holder = hold(model, b)
    with pytest.raises(DeadlineExceeded) as late:
        b(["late"])
    assert status(late.value) == 503
    assert "Retry-After" in headers(late.value)
    model.gate.set()
    holder.join(5)
    assert b(["next"]) == ["NEXT"]
    assert all("late" not in batch for batch in model.batches)
    assert b.stats.timed_out >= 1


def test_several_workers_run_batches_at_once() -> None:
    both_inside = threading.Barrier(2, timeout=5)

    def run(texts: list[str]) -> list[str]:
        both_inside.wait()  # passes only if a second worker runs a batch at the same time
        return [t.upper() for t in texts]

    b = DynamicBatcher(
        run,
        max_batch=1,
        max_wait=0.0,
        max_queued=64,
        timeout=10.0,
        workers=2,
    )
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(b, [f"t{i}"]) for i in range(4)]
        assert [f.result(10) for f in futures] == [[f"T{i}"] for i in range(4)]
    assert b.stats.batches == 4


def test_one_request_is_shared_out_among_idle_workers() -> None:
    """8 texts on 2 idle workers: 4 each, at the same time, answered in the request's order."""
    both_inside = threading.Barrier(2, timeout=5)
    calls: list[list[str]] = []

    def run(texts: list[str]) -> list[str]:
        calls.append(texts)
        both_inside.wait()  # passes only if the other worker runs the other share meanwhile
        return [t.upper() for t in texts]

    b = DynamicBatcher(run, max_batch=32, max_wait=0.0, max_queued=64, timeout=10.0, workers=2)
    texts = [f"t{i}" for i in range(8)]
    assert b(texts) == [t.upper() for t in texts]
    assert sorted(len(c) for c in calls) == [4, 4]


def test_one_worker_runs_one_batch_at_a_time() -> None:
    inside = 0
    most = 0
    lock = threading.Lock()

    def run(texts: list[str]) -> list[str]:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.02)
        with lock:
            inside -= 1
        return texts

    b = DynamicBatcher(run, max_batch=1, max_wait=0.0, max_queued=64, timeout=10.0)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda i: b([str(i)]), range(6)))
    assert most == 1


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        DynamicBatcher(lambda t: t, max_batch=1, max_wait=0, max_queued=1, timeout=1, workers=0)
